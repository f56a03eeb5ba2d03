// Parses PromQL expressions with Prometheus's own grammar (@prometheus-io/lezer-promql).
// stdin: a JSON array of expressions; stdout: a JSON array, per expression, of
// {"errors": [offsets where the grammar fails], "series": [metric names it selects]}.
// Used by tests/deploy/test_grafana.py.
import { readFileSync } from "node:fs";
import { parser } from "@prometheus-io/lezer-promql";

const expressions = JSON.parse(readFileSync(0, "utf8"));
const results = expressions.map((expr) => {
  const errors = [];
  const series = [];
  parser.parse(expr).iterate({
    enter(node) {
      if (node.type.isError) errors.push(node.from);
      if (node.name === "Identifier" && node.node.parent?.name === "VectorSelector") {
        series.push(expr.slice(node.from, node.to));
      }
    },
  });
  return { errors, series };
});
process.stdout.write(JSON.stringify(results));
