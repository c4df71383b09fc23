"""Times on the pages: in the hospital's time zone (`[hospital] time_zone`), the UTC time on hover and in the
markup (`<time datetime>`), so a screenshot or a copied line is never ambiguous."""
from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from markupsafe import Markup, escape


def zone(name: str | None) -> ZoneInfo:
    return ZoneInfo(name or "UTC")


def when(epoch: float | None, tz: ZoneInfo) -> Markup:
    """`<time>` showing `epoch` in `tz` (with the zone's abbreviation), UTC in its title; empty for None."""
    if not epoch:
        return Markup("")
    moment = datetime.fromtimestamp(epoch, UTC)
    local = moment.astimezone(tz)
    utc = moment.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{}" title="{}">{}</time>').format(
        moment.strftime("%Y-%m-%dT%H:%M:%SZ"), utc, escape(local.strftime("%Y-%m-%d %H:%M %Z")))
