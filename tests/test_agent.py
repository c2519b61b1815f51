"""--agent: the health mapping (pure) and HAProxy agent-check lines over loopback."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from fakes import backend, closed_port, config, echo, gatekeeper, receive_all

from gatekeeper import cli
from gatekeeper.net.addresses import TcpAddress
from gatekeeper.observe.agent import Health, State, agent_line, health, keepalived_exit
from gatekeeper.observe.statuscmd import format_status
from gatekeeper.usage import UsageError

MiB = 2**20


def picture(**changes: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "stopping": False, "running": 0, "queued": 0, "max_jobs": 4, "hold": None,
        "available_bytes": 4000 * MiB, "min_free_bytes": 512 * MiB, "reserved_bytes": 0,
        "job_footprint_bytes": 256 * MiB, "backend": {"ok": True, "error": None},
    }
    status.update(changes)
    return status


@pytest.mark.parametrize(("changes", "line", "code"), [
    ({}, "up ready 100% maxconn:4\n", 102),
    ({"running": 1}, "up ready 75% maxconn:4\n", 77),
    ({"running": 3, "queued": 1}, "up ready 1% maxconn:4\n", 3),  # busy, not full: 1 %
    ({"running": 4, "queued": 9, "hold": "slots"}, "up ready 1% maxconn:4\n", 3),
    # The memory rule would hold a new job: 4000 - 3300 - 256 < 512.
    ({"reserved_bytes": 3300 * MiB}, "drain\n", 2),
    ({"available_bytes": 700 * MiB}, "drain\n", 2),
    ({"available_bytes": 768 * MiB}, "up ready 100% maxconn:4\n", 102),  # exactly fits
    ({"hold": "memory", "queued": 1}, "drain\n", 2),
    ({"hold": "pressure", "queued": 1}, "drain\n", 2),
    ({"hold": "paused", "queued": 1}, "drain\n", 2),
    ({"pausing": {"paused": 1}}, "drain\n", 2),  # memory ran out under a running job
    ({"pausing": {"paused": 0}}, "up ready 100% maxconn:4\n", 102),
    ({"pausing": "garbage"}, "up ready 100% maxconn:4\n", 102),
    ({"available_bytes": None}, "up ready 100% maxconn:4\n", 102),  # no reading yet
    ({"backend": {"ok": False, "error": "connect x:1: refused"}},
     "down #backend unreachable: connect x:1: refused\n", 1),
    ({"backend": {"ok": None, "error": None}}, "up ready 100% maxconn:4\n", 102),
    ({"stopping": True, "available_bytes": 0}, "down #stopping\n", 1),
])
def test_mapping(changes: dict[str, Any], line: str, code: int) -> None:
    h = health(picture(**changes))
    assert agent_line(h) == line
    assert keepalived_exit(h) == code
    assert 2 <= keepalived_exit(h) <= 255 or keepalived_exit(h) == 1


def test_reason_stays_on_one_line() -> None:
    line = agent_line(Health(State.DOWN, 0, 1, "a\nb\r\x00c" + "z" * 500))
    assert line.count("\n") == 1 and line.endswith("\n")
    assert line.isascii() and len(line) < 250


def test_garbage_status_does_not_crash_the_mapping() -> None:
    assert health({}).state is State.UP
    assert health({"max_jobs": "x", "running": None, "backend": 3}).state is State.UP


async def agent_says(gk: Any) -> str:
    host, _, port = gk.server.agent_addresses[0].rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        return (await receive_all(stream)).decode()


async def test_agent_over_loopback_follows_memory_and_backend() -> None:
    agent = TcpAddress("127.0.0.1", 0)
    async with backend(echo) as be, \
            gatekeeper(config(be.address, agent=agent, max_jobs=3, min_free_bytes=100 * MiB),
                       available=1000 * MiB) as gk:
        assert await agent_says(gk) == "up ready 100% maxconn:3\n"
        gk.memory.value = 50 * MiB  # below --min-free-mb: a new job would be held
        assert await agent_says(gk) == "drain\n"
        gk.memory.value = 1000 * MiB
        assert await agent_says(gk) == "up ready 100% maxconn:3\n"

    async with gatekeeper(config(closed_port(), agent=agent)) as gk:
        line = await agent_says(gk)
        assert line.startswith("down #backend unreachable: connect 127.0.0.1:")
        assert line.endswith("\n") and line.count("\n") == 1


# -- gatekeeper status / weight -----------------------------------------------


def test_status_table_shows_the_queue() -> None:
    text = format_status(picture(running=4, queued=3, hold="slots", queue=[
        {"peer": "10.0.0.7:51234", "waiting_seconds": 3.14},
        {"peer": "[fd00::1]:4000", "waiting_seconds": 0.5}]), "127.0.0.1:3634")
    assert "running    4/4" in text
    assert "held for slots" in text
    assert "10.0.0.7:51234" in text and "3.1s" in text
    assert "... and 1 more" in text
    assert format_status({}, "x")  # garbage in, still a table
    hostile = format_status({"measuring": "x\x1b[2J\nend peer=forged", "admitted_total": 9,
                             "backfilled_total": 2}, "x")
    assert "9 (2 backfilled)" in hostile
    assert "pausing    off" in hostile
    assert "\x1b" not in hostile and "\nend peer" not in hostile  # escaped


def test_status_table_shows_each_job_and_pausing() -> None:
    text = format_status(picture(
        running=2, pausing={"floor_bytes": 32 * MiB, "resume_bytes": 64 * MiB, "paused": 1,
                            "pauses_total": 3, "cuts_total": 0},
        jobs=[{"peer": "10.0.0.7:1", "job": "src/a.o", "state": "running",
               "running_seconds": 12.25, "paused_seconds": 0.0, "pauses": 0,
               "estimate_bytes": 200 * MiB, "charge_bytes": 150 * MiB},
              {"peer": "10.0.0.8:2", "job": "x\x1b[2J" + "/long" * 20 + ".o",
               "state": "paused", "running_seconds": 3.0, "paused_seconds": 2.5,
               "pauses": 1, "estimate_bytes": None, "charge_bytes": "junk"}]), "x")
    assert "pausing    below 32 MiB, resume at 64 MiB; 1 paused now, 3 pauses, 0 cut" in text
    lines = text.splitlines()
    a = next(line for line in lines if "src/a.o" in line)
    assert a.split()[1:] == ["running", "12.2s", "0.0s", "200", "MiB", "150", "MiB"]
    b = next(line for line in lines if "paused " in line and "long" in line)
    assert "\x1b" not in text and b.split()[-5:] == ["paused", "3.0s", "2.5s", "?", "?"]


def test_subcommand_flags_and_main_parsing() -> None:
    assert cli.main(["status", "--bogus"]) == 2
    assert cli.main(["weight", "--metrics", "nope:port"]) == 2
    assert cli.main(["weight", "--metrics", f"127.0.0.1:{closed_port().port}"]) == 1
    options = cli.parse_options(["--metrics", "3634", "--agent", "5555"])
    assert options.config.metrics == TcpAddress("127.0.0.1", 3634)
    assert options.config.agent == TcpAddress(None, 5555)
    with pytest.raises(UsageError, match="--agent"):
        cli.parse_options(["--agent", "x:y"])


async def test_status_and_weight_commands_read_a_running_gatekeeper(
        capsys: pytest.CaptureFixture[str]) -> None:
    metrics = TcpAddress("127.0.0.1", 0)
    async with backend(echo) as be, \
            gatekeeper(config(be.address, metrics=metrics, min_free_bytes=100 * MiB),
                       available=1000 * MiB) as gk:
        address = gk.server.metrics_addresses[0]

        async def run(command: str) -> int:
            return await trio.to_thread.run_sync(cli.main, [command, "--metrics", address])

        assert await run("status") == 0
        out = capsys.readouterr().out
        assert f"at {address}: up, 100% free" in out and "running    0/2" in out
        assert await run("weight") == 102
        gk.memory.value = 50 * MiB
        assert await run("weight") == 2  # draining: weight 0
