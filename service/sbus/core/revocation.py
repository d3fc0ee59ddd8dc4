"""Revoking a capability token by its ``jti``: how long the revocation is kept.

One rule for every way in (``POST /admin/tokens/revoke`` and ``sbus token revoke``), so
the two can never disagree about when a revoked token could work again.
"""

from __future__ import annotations

from sbus.core.errors import ValidationFailed
from sbus.core.store import Store

MAX_UNTIL_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last RFC 3339 instant


def revocation_until(exp: int | None, *, now_ms: int, leeway_s: int, max_ttl_s: int) -> int:
    """Until when (store-clock epoch ms) to keep a revocation made at ``now_ms``.

    Deadlines are on the store clock, which also purges the list. Past ``exp`` + leeway
    by that clock every replica refuses the token as expired (sbus.api.auth), so the entry
    is needed until then; an ``exp`` already past still gets the leeway. Without ``exp``:
    the longest lifetime a token may have, from now. Raises :class:`ValidationFailed`
    past year 9999 (no RFC 3339 form)."""
    leeway_ms = leeway_s * 1000
    if exp is None:
        return now_ms + max_ttl_s * 1000 + leeway_ms
    until_ms = max(exp * 1000, now_ms) + leeway_ms
    if until_ms > MAX_UNTIL_MS:
        raise ValidationFailed(
            "exp (plus the clock leeway) must not pass 9999-12-31T23:59:59Z", loc=["body", "exp"]
        )
    return until_ms


async def revoke_token(
    store: Store, jti: str, exp: int | None, *, leeway_s: int, max_ttl_s: int
) -> int:
    """Put ``jti`` on the store's revocation list (every replica refuses it at once);
    returns until when it is kept (store-clock epoch ms)."""
    now_ms = await store.now_ms()
    until_ms = revocation_until(exp, now_ms=now_ms, leeway_s=leeway_s, max_ttl_s=max_ttl_s)
    await store.revoke(jti, until_ms)
    return until_ms
