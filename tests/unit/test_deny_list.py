"""The deny list of logged-out tokens (`marco.revocations.DeniedTokens`): entries live until
their token's own expiry, no longer."""

from __future__ import annotations

import json
import time
from pathlib import Path

from marco.revocations import DeniedTokens, token_digest


def test_entries_past_their_expiry_are_dropped_at_the_next_change(tmp_path: Path) -> None:
    path = tmp_path / "denied-tokens.json"
    now = time.time()
    old, live, new = token_digest("old"), token_digest("live"), token_digest("new")
    path.write_text(json.dumps({old: now - 1, live: now + 3600}))  # kept while `old` was valid
    denied = DeniedTokens(path)
    denied.load()
    assert denied.update({new: now + 3600}) == [new]
    assert set(denied.table()) == {live, new}
    assert set(json.loads(path.read_text())) == {live, new}  # on disk too
    assert denied.denied("live") and not denied.denied("old")


def test_a_token_already_expired_is_not_listed(tmp_path: Path) -> None:
    denied = DeniedTokens(tmp_path / "denied-tokens.json")
    assert denied.update({token_digest("gone"): time.time() - 1}) == []
    assert denied.table() == {} and not (tmp_path / "denied-tokens.json").exists()
