"""The Segment spec event names the stages act on: the only place they are spelled.

Senders vary the case and spacing, so every stage compares names in one form,
:func:`name_key` (trimmed, lower-cased). The email spec's names are also sent without
the ``Email`` prefix where that varies (``Email Unsubscribed``, ``Marked as Spam``):
:data:`EMAIL_EVENTS` maps each accepted form to the spec's name, so the collector's email
channel, the CRM's email interactions and the computed email counters agree on what an
email event is.
"""

# E-commerce spec (https://segment.com/docs/connections/spec/ecommerce/v2/).
ORDER_COMPLETED = "Order Completed"
ORDER_UPDATED = "Order Updated"
ORDER_REFUNDED = "Order Refunded"
ORDER_CANCELLED = "Order Cancelled"
CHECKOUT_STARTED = "Checkout Started"
CHECKOUT_STEP_COMPLETED = "Checkout Step Completed"
PAYMENT_INFO_ENTERED = "Payment Info Entered"
PRODUCT_VIEWED = "Product Viewed"
PRODUCT_ADDED = "Product Added"
PRODUCT_REMOVED = "Product Removed"
CART_VIEWED = "Cart Viewed"

# Email spec (https://segment.com/docs/connections/spec/email/).
EMAIL_SENT = "Email Sent"
EMAIL_DELIVERED = "Email Delivered"
EMAIL_OPENED = "Email Opened"
EMAIL_LINK_CLICKED = "Email Link Clicked"
EMAIL_BOUNCED = "Email Bounced"
EMAIL_MARKED_AS_SPAM = "Email Marked as Spam"
UNSUBSCRIBED = "Unsubscribed"

# B2B SaaS spec: what makes a CRM contact a lead.
FORM_SUBMITTED = "Form Submitted"
SIGNED_UP = "Signed Up"


def name_key(name: str) -> str:
    """The form names are compared in: trimmed, lower-cased."""
    return name.strip().lower()


# What ``str.strip()`` trims (every character ``str.isspace()``), for SQL to trim the
# same: ``btrim`` alone trims spaces only, and a name sent as "Form Submitted\t" would
# then be another name in a query than in Python (``profiles.sql.name_key_of``).
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004"
    "\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


# Accepted form -> the spec's name.
EMAIL_EVENTS: dict[str, str] = {
    **{
        name_key(n): n
        for n in (
            EMAIL_SENT,
            EMAIL_DELIVERED,
            EMAIL_OPENED,
            EMAIL_LINK_CLICKED,
            EMAIL_BOUNCED,
            EMAIL_MARKED_AS_SPAM,
            UNSUBSCRIBED,
        )
    },
    "email unsubscribed": UNSUBSCRIBED,
    "marked as spam": EMAIL_MARKED_AS_SPAM,
}
# Events whose properties the e-commerce spec types (an order or a product).
ORDER_EVENTS = frozenset(name_key(n) for n in (ORDER_COMPLETED, ORDER_REFUNDED, CHECKOUT_STARTED))
PRODUCT_EVENTS = frozenset(name_key(n) for n in (PRODUCT_VIEWED, PRODUCT_ADDED))
# Every e-commerce spec event: the purchase channel.
PURCHASE_EVENTS = frozenset(
    name_key(n)
    for n in (
        ORDER_COMPLETED,
        ORDER_UPDATED,
        ORDER_REFUNDED,
        ORDER_CANCELLED,
        CHECKOUT_STARTED,
        CHECKOUT_STEP_COMPLETED,
        PAYMENT_INFO_ENTERED,
        PRODUCT_VIEWED,
        PRODUCT_ADDED,
        PRODUCT_REMOVED,
        CART_VIEWED,
    )
)
