"""Activation: unified profiles out to the neighbouring systems.

A consumer group of its own (``cdp-stream activation``) reads ``cdp.profile-updates`` and,
per micro-batch in one transaction, keeps

* the CRM feed (``crm/``): one contact per person with an email or user id, and one
  interaction record per event worth a salesperson's eye; optionally POSTed to a CRM
  webhook (``crm/webhook.py``), signed, retried, dead-lettered;
* audience membership (``audiences/``): JSON rules over traits, computed traits and
  recent events, entered and exited as profiles change and as time passes;

and, on a timer, the DMP feed (``dmp/``): per audience, anonymized member counts per
window and coarse bucket, published to ``cdp.dmp.audience-counts``: never an identifier.
Everything it writes is keyed so that a redelivered update changes nothing twice.
"""
