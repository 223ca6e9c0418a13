"""How late after its token expires an open WebSocket closes (4401), against a ping round trip.

The test (`tests/agent/test_stream.py`) asserts only the order: the socket serves the token while
it is valid and closes after it expires. How promptly is measured here: one agent with
`--token-max-age 2`, one socket per round with a fresh token; each round first times pings on
that socket (the baseline: one message from the agent to the client), then the delay from the
token's expiry (`TokenSigner.expires_at`, wall clock) to the close reaching the client.

    python bench/token_expiry.py [--rounds 5] [--pings 20]
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marco.errors import AuthenticationError  # noqa: E402
from marco.tokens import TokenSigner, create_secret, load_secret  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.pki import TestPki  # noqa: E402

MAX_AGE = 2


async def ping_ms(agent: AgentProcess, token: str, pings: int) -> list[float]:
    """Round trips of `ping` on one socket, in milliseconds."""
    stream = agent.async_client(token).stream()
    await stream.connect()
    times = []
    for number in range(pings):
        started = time.perf_counter()
        await stream.send({"type": "ping", "data": str(number)})
        reply = await stream.read()
        times.append((time.perf_counter() - started) * 1000)
        assert reply is not None and reply["type"] == "pong", reply
    stream.close()
    return times


async def close_delay_ms(agent: AgentProcess, signer: TokenSigner, user: str) -> float:
    """From the token's expiry to the agent's close arriving on an idle socket."""
    token = signer.issue(user)
    stream = agent.async_client(token).stream()
    await stream.connect()
    try:
        while True:
            await asyncio.wait_for(stream.read(), MAX_AGE + 30)
    except AuthenticationError:
        closed = time.time()
    assert stream.close_code == 4401, stream.close_code
    return (closed - signer.expires_at(token)) * 1000


async def main_async(args: argparse.Namespace) -> None:
    user = getpass.getuser()
    with tempfile.TemporaryDirectory(prefix="marco-bench-") as tmp:
        secret = create_secret(Path(tmp) / "secret")
        signer = TokenSigner(load_secret(secret), MAX_AGE)
        agent = AgentProcess(secret, Path(tmp) / "state", node_name="bench",
                             extra_args=["--log-level", "warning", "--token-max-age",
                                         str(MAX_AGE)], pki=TestPki(Path(tmp) / "pki"))
        pings: list[float] = []
        delays: list[float] = []
        try:
            for _ in range(args.rounds):  # interleaved: baseline, then the measured close
                pings += await ping_ms(agent, signer.issue(user), args.pings)
                delays.append(await close_delay_ms(agent, signer, user))
        finally:
            agent.stop()
    ping, delay = statistics.median(pings), statistics.median(delays)
    print("| what | median ms | max ms | ratio to a ping |")
    print("|---|---:|---:|---:|")
    print(f"| ping round trip ({len(pings)}) | {ping:.2f} | {max(pings):.2f} | 1.0x |")
    print(f"| token expiry to close on the client ({len(delays)}) | {delay:.2f} | "
          f"{max(delays):.2f} | {delay / ping:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pings", type=int, default=20)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
