"""The marketer API: read profiles (and, later, audiences, CRM and DMP feeds) from Postgres.

Every route needs a Bearer API token with the route's scope; write keys never work here.
"""
