"""The CRM feed: one contact per person with an email or user id and the interactions a
salesperson wants to see (``feed.py``, from ``contacts.py`` and ``interactions.py``, kept
in ``repository.py``), announced to a CRM webhook (``messages.py``, ``webhook.py``). The
rules are specified in docs/crm.md and docs/crm-webhook.md.
"""
