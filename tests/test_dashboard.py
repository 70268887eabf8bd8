"""The read-only dashboard (issue 16): its JSON API against a real broker over
real HTTP, who may see it, the hostile inputs it must survive without
disturbing job routing, and a real headless Chromium driving the page.

Every wait is bounded (WAIT_S, or WebDriverWait's timeout).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from reasonbroker.core.limits import ListenerRole
from reasonbroker.daemon import dashboard as dashboard_module
from reasonbroker.daemon import metrics
from reasonbroker.daemon.broker import Broker
from reasonbroker.daemon.config import Config, ListenerConfig
from reasonbroker.daemon.dashboard import TOKEN_COOKIE, Ring, access_for, quantile_ms
from reasonbroker.sdk.client import Client, JobHandle
from reasonbroker.sdk.errors import ProcessorException
from reasonbroker.sdk.worker import Worker
from tests.handlers import Gate, echo
from tests.rawpeer import WAIT_S

ADMIN_TOKEN = "dash-admin-s3cret-77c1"
CLIENT_TOKEN = "dash-client-s3cret-0b5e"


def _config(tokens: bool = False, admin: bool = True, journal: Path | None = None) -> Config:
    return Config(
        listeners=(
            ListenerConfig(
                "tcp://127.0.0.1:0",
                ListenerRole.CLIENTS,
                token=CLIENT_TOKEN if tokens else None,
                admin_token=ADMIN_TOKEN if tokens and admin else None,
            ),
            ListenerConfig("tcp://127.0.0.1:0", ListenerRole.WORKERS),
        ),
        metrics_address="127.0.0.1:0",
        journal_path=None if journal is None else str(journal),
    )


async def until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not cond():  # noqa: ASYNC110 - a predicate poll, not a fixed sleep
            await asyncio.sleep(0.005)


async def fail(variables: Any) -> Any:
    raise ValueError(f"no good: {variables!r}")


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = lines[0]
        self.code = int(lines[0].split()[1]) if len(lines[0].split()) > 1 else 0
        self.headers = {k.lower(): v for k, _, v in (ln.partition(": ") for ln in lines[1:])}

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_http(address: str, request: bytes) -> bytes:
    """Everything the server sends back for `request`, up to its close (b"" if none)."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        try:
            await writer.drain()
            async with asyncio.timeout(WAIT_S):
                return await reader.read()
        except ConnectionResetError:
            return b""
    finally:
        writer.close()


async def get(broker: Broker, path: str, headers: dict[str, str] | None = None) -> Answer:
    address = broker.metrics_address
    assert address is not None
    headers = {"Host": address, **(headers or {})}
    lines = [f"GET {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    return Answer(await raw_http(address, ("\r\n".join(lines) + "\r\n\r\n").encode()))


async def api(broker: Broker, path: str, headers: dict[str, str] | None = None) -> Any:
    answer = await get(broker, path, headers)
    assert answer.code == 200, (answer.status, answer.body[:300])
    assert answer.headers["content-type"] == "application/json"
    return answer.json()


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with Broker(_config()) as b:
        yield b


@pytest.fixture
async def worker(broker: Broker) -> AsyncIterator[tuple[Worker, Gate]]:
    gate = Gate()
    w = Worker(
        broker.address("worker"),
        handlers={"echo": echo, "fail": fail, "slow": gate},
        capacity=2,
        name="dash-w1",
    )
    async with w:
        await w.wait_registered(timeout=WAIT_S)
        yield w, gate
        gate.release.set()


def _fresh_view_cache(broker: Broker) -> None:
    # Views are snapshots up to _VIEW_TTL_S old; a test that just changed the
    # board asks for a fresh one instead of waiting.
    assert broker.dashboard is not None
    broker.dashboard._views.clear()


# --------------------------------------------------------------------------- the API


async def test_api_shows_workers_pipelines_clients_and_failures(
    broker: Broker, worker: tuple[Worker, Gate]
) -> None:
    _, gate = worker
    async with Client(broker.address("client"), name="dash-c1") as client:
        for i in range(3):
            assert await client.run("echo", i) == i
        with pytest.raises(ProcessorException):
            await client.run("fail", "x" * 10)
        slow: list[JobHandle] = [await client.submit("slow", i) for i in range(3)]
        await until(lambda: broker.board.running == 2 and broker.board.queue_depth == 1)
        _fresh_view_cache(broker)

        [w] = (await api(broker, "/api/workers"))["rows"]
        assert (w["name"], w["capacity"], w["busy"]) == ("dash-w1", 2, 2)
        assert (w["done"], w["failed"], w["draining"]) == (3, 1, False)
        assert w["pipelines"] == ["echo", "fail", "slow"]
        assert w["address"].startswith("127.0.0.1:")
        assert w["connected_at"] <= (await api(broker, "/api/overview"))["now"]
        assert 0 <= w["last_heard_s"] < WAIT_S

        pipes = {p["pipeline"]: p for p in (await api(broker, "/api/pipelines"))["rows"]}
        assert {k: pipes["echo"][k] for k in ("queued", "running", "done", "failed")} == {
            "queued": 0,
            "running": 0,
            "done": 3,
            "failed": 0,
        }
        assert (pipes["fail"]["done"], pipes["fail"]["failed"]) == (0, 1)
        assert (pipes["slow"]["queued"], pipes["slow"]["running"]) == (1, 2)
        assert pipes["slow"]["oldest_queued_s"] >= 0
        assert pipes["echo"]["oldest_queued_s"] is None

        [c] = (await api(broker, "/api/clients"))["rows"]
        assert (c["name"], c["in_flight"]) == ("dash-c1", 3)

        [failure] = (await api(broker, "/api/failures"))["rows"]
        assert (failure["pipeline"], failure["rc"]) == ("fail", "PROCESSOR_EXCEPTION")
        assert "no good" in failure["error"]
        assert any("ValueError" in line for line in failure["stacktrace"])

        ov = await api(broker, "/api/overview")
        totals = ov["totals"]
        assert (totals["accepted"], totals["ended"], totals["failed"]) == (7, 4, 1)
        assert (totals["running"], totals["queued"], totals["workers"]) == (2, 1, 1)
        assert totals["p50_ms"] is not None
        assert ov["version"] and ov["uptime_s"] > 0 and len(ov["nodes"]) == 1

        gate.release.set()
        async with asyncio.timeout(WAIT_S):
            assert [await h for h in slow] == [0, 1, 2]


async def test_overview_series_come_from_the_ring(
    broker: Broker, worker: tuple[Worker, Gate]
) -> None:
    assert broker.dashboard is not None
    async with Client(broker.address("client")) as client:
        for i in range(5):
            await client.run("echo", i)
    broker.dashboard.sample()  # as the broker's once-a-second timer does
    _fresh_view_cache(broker)
    series = (await api(broker, "/api/overview"))["series"]
    assert len(series["t"]) >= 1
    assert sum(series["ended_per_s"]) > 0
    assert series["p50_ms"][-1] is not None
    assert len(series["queued"]) == len(series["t"]) == len(series["p99_ms"])


async def test_job_lookup_live_and_ended_with_payloads_on_request(
    broker: Broker, worker: tuple[Worker, Gate]
) -> None:
    _, gate = worker
    async with Client(broker.address("client")) as client:
        big = "y" * 10_000
        running = await client.submit("slow", {"text": big})
        await until(lambda: broker.board.running == 1)
        found = await api(broker, f"/api/jobs/{running.cookie}")
        assert (found["state"], found["pipeline"], found["attempts"]) == ("running", "slow", 1)
        assert "variables" not in found  # payloads only on request
        shown = (await api(broker, f"/api/jobs/{running.cookie}?payload=1"))["variables"]
        assert shown["truncated"] and len(shown["text"]) <= 4096
        assert shown["text"].startswith('{"text": "yyy')
        gate.release.set()
        await running

        # Without a journal the board keeps detached jobs' results.
        detached = await client.submit("echo", {"n": 1}, detach=True)
        await until(lambda: detached.cookie.bytes in broker.board.retained)
        ended = await api(broker, f"/api/jobs/{detached.cookie.hex}?payload=1")
        assert (ended["state"], ended["rc"], ended["retained"]) == ("ended", "OK", True)
        assert ended["result"]["text"] == '{"n": 1}'
        assert ended["ended_at"] >= ended["accepted_at"]

    missing = await get(broker, f"/api/jobs/{uuid.uuid4()}")
    assert missing.code == 404 and "no job" in missing.json()["error"]
    for bad in ("not-a-cookie", "%2e%2e%2f%2e%2e", "0" * 65):
        assert (await get(broker, f"/api/jobs/{bad}")).code == 400


async def test_job_lookup_with_the_journal_finds_every_ended_job(tmp_path: Path) -> None:
    async with Broker(_config(journal=tmp_path / "journal.sqlite3")) as broker:
        async with Worker(broker.address("worker"), handlers={"fail": fail}) as w:
            await w.wait_registered(timeout=WAIT_S)
            async with Client(broker.address("client")) as client:
                handle = await client.submit("fail", [1, 2])
                with pytest.raises(ProcessorException):
                    await handle
        found = await api(broker, f"/api/jobs/{handle.cookie}?payload=1")
        assert (found["state"], found["rc"], found["retained"]) == (
            "ended",
            "PROCESSOR_EXCEPTION",
            True,
        )
        assert "no good: [1, 2]" in found["error"]
        assert any("ValueError" in line for line in found["stacktrace"])
        assert (await api(broker, "/api/overview"))["journal"]["durable"] is True


async def test_a_draining_worker_is_marked(broker: Broker, worker: tuple[Worker, Gate]) -> None:
    w, gate = worker
    async with Client(broker.address("client")) as client:
        handle = await client.submit("slow", 1)
        await gate.entered.wait()
        w.stop()  # says DRAIN; its running job goes on
        await until(lambda: any(c.draining for c in broker.board.connections()))
        _fresh_view_cache(broker)
        [row] = (await api(broker, "/api/workers"))["rows"]
        assert row["draining"] is True
        page = await get(broker, "/")
        assert b"<span class=draining>draining</span>" in page.body
        gate.release.set()
        assert await handle == 1


async def test_the_page_is_server_rendered_and_its_assets_come_from_the_package(
    broker: Broker, worker: tuple[Worker, Gate]
) -> None:
    page = await get(broker, "/")
    assert page.code == 200 and page.headers["content-type"].startswith("text/html")
    assert b"dash-w1" in page.body  # the worker row, without any script
    assert b"<script src=/static/dashboard.js>" in page.body
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        answer = await get(broker, f"/static/{asset}")
        assert answer.code == 200 and answer.headers["content-type"].startswith(kind)
        assert answer.body and b"http://" not in answer.body and b"https://" not in answer.body
    index = await api(broker, "/api")
    assert "/api/jobs/COOKIE" in index["endpoints"]


async def test_head_has_the_headers_of_get_without_the_body(broker: Broker) -> None:
    address = broker.metrics_address
    assert address is not None
    request = f"HEAD /api/workers HTTP/1.1\r\nHost: {address}\r\n\r\n".encode()
    head = Answer(await raw_http(address, request))
    assert head.code == 200 and head.body == b""
    assert int(head.headers["content-length"]) > 0


async def test_lists_are_cut_at_the_row_limit(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard_module, "_MAX_ROWS", 2)
    workers = [
        Worker(broker.address("worker"), handlers={"echo": echo}, name=f"w{i}") for i in range(3)
    ]
    for w in workers:
        await w.__aenter__()
    try:
        for w in workers:
            await w.wait_registered(timeout=WAIT_S)
        listing = await api(broker, "/api/workers")
        assert (len(listing["rows"]), listing["total"], listing["truncated"]) == (2, 3, True)
    finally:
        for w in workers:
            await w.__aexit__(None, None, None)


# --------------------------------------------------------------------------- who may see it


async def test_with_tokens_nothing_but_a_login_page_without_the_admin_token() -> None:
    async with Broker(_config(tokens=True)) as broker:
        async with Worker(broker.address("worker"), handlers={"echo": echo}, name="secret-w"):
            await until(lambda: bool(broker.board.workers()))
            page = await get(broker, "/")
            assert page.code == 401
            assert b"id=login" in page.body and b"secret-w" not in page.body
            for path in ("/api/workers", "/api/overview", f"/api/jobs/{uuid.uuid4()}"):
                refused = await get(broker, path)
                assert refused.code == 401 and b"secret-w" not in refused.body
            wrong = await get(broker, "/api/workers", {"Authorization": "Bearer nope"})
            assert wrong.code == 401
            # The listener's own (non-admin) token is not the admin token.
            client_token = await get(
                broker, "/api/workers", {"Authorization": f"Bearer {CLIENT_TOKEN}"}
            )
            assert client_token.code == 401

            bearer = await api(broker, "/api/workers", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert bearer["rows"][0]["name"] == "secret-w"
            cookie = f"other=1; {TOKEN_COOKIE}={ADMIN_TOKEN}"
            page = await get(broker, "/", {"Cookie": cookie})
            assert page.code == 200 and b"secret-w" in page.body
            # The login page's script and the stylesheet need no token.
            assert (await get(broker, "/static/login.js")).code == 200


async def test_with_tokens_and_no_admin_token_it_is_locked() -> None:
    async with Broker(_config(tokens=True, admin=False)) as broker:
        page = await get(broker, "/")
        assert page.code == 401 and b"admin_token" in page.body
        answer = await get(broker, "/api/workers", {"Authorization": f"Bearer {CLIENT_TOKEN}"})
        assert answer.code == 401


def test_open_only_on_loopback_with_no_token_anywhere() -> None:
    assert access_for([(None, None), (None, None)], metrics_loopback=True).open
    # Not loopback: locked even with no token anywhere (no admin token to give).
    assert access_for([(None, None)], metrics_loopback=False).tokens == frozenset()
    assert access_for([("t", None)], metrics_loopback=True).tokens == frozenset()
    both = access_for([("t", "a1"), (None, "a2")], metrics_loopback=False)
    assert both.tokens == frozenset({b"a1", b"a2"})
    assert both.refuses({b"authorization": b"Bearer a2"}) is None
    assert both.refuses({b"authorization": b"Bearer t"}) == "token"
    assert both.refuses({b"cookie": TOKEN_COOKIE.encode() + b"=a1"}) is None


async def test_an_open_dashboard_refuses_a_host_name(broker: Broker) -> None:
    # DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends its own Host.
    answer = await get(broker, "/api/workers", {"Host": "evil.example"})
    assert answer.code == 403
    for host in ("localhost:9464", "127.0.0.1", "[::1]:80"):
        assert (await get(broker, "/api/workers", {"Host": host})).code == 200


# --------------------------------------------------------------------------- hostile input


@pytest.fixture
async def routing(broker: Broker, worker: tuple[Worker, Gate]) -> AsyncIterator[Callable[[], int]]:
    """Jobs running back to back for the whole test; yields how many have ended
    OK so far, and checks at the end that every one of them did."""
    done = 0
    stop = asyncio.Event()

    async def loop(client: Client) -> None:
        nonlocal done
        i = 0
        while not stop.is_set():
            assert await client.run("echo", i, timeout=WAIT_S) == i
            done += 1
            i += 1

    async with Client(broker.address("client")) as client:
        task = asyncio.create_task(loop(client))
        await until(lambda: done > 0)
        yield lambda: done
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await task  # raises if any job failed


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"\x00\x01\xfe garbage\r\n\r\n", 400),
        (b"DELETE /api/workers HTTP/1.1\r\n\r\n", 405),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 405),
        (b"BREW /api HTTP/1.1\r\n\r\n", 405),
        (b"GET /static/../daemon/broker.py HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
        (b"GET /static/%2e%2e/dashboard.py HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
        (b"GET /static//etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
        (b"GET /api/../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
        (b"GET /api/jobs/..%2f..%2fetc HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
        (
            b"GET /api/workers?"
            + b"&".join(b"a%d=1" % i for i in range(50))
            + b" HTTP/1.1\r\n\r\n",
            400,
        ),
    ],
)
async def test_garbage_methods_and_traversal_get_an_http_error(
    broker: Broker, routing: Callable[[], int], request_bytes: bytes, code: int
) -> None:
    address = broker.metrics_address
    assert address is not None
    answer = Answer(await raw_http(address, request_bytes))
    assert answer.code == code
    assert b"root:" not in answer.body and b"import" not in answer.body
    if code == 405:
        assert answer.headers["allow"] == "GET, HEAD"
    before = routing()
    await until(lambda: routing() > before)  # jobs still flow


async def test_a_10_mb_header_is_closed_unanswered_and_jobs_flow(
    broker: Broker, routing: Callable[[], int]
) -> None:
    address = broker.metrics_address
    assert address is not None
    request = b"GET / HTTP/1.1\r\nX-Big: " + b"x" * (10 * 1024 * 1024) + b"\r\n\r\n"
    assert await raw_http(address, request) == b""
    before = routing()
    await until(lambda: routing() > before)
    assert (await get(broker, "/api/workers")).code == 200


async def _read_or_reset(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""  # aborted: refused past the connection cap


async def test_slow_and_idle_connections_are_bounded_and_jobs_flow(
    broker: Broker, routing: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "_REQUEST_TIMEOUT_S", 0.5)
    address = broker.metrics_address
    assert address is not None
    host, _, port = address.rpartition(":")
    slow = [await asyncio.open_connection(host, int(port)) for _ in range(80)]
    try:
        for _, writer in slow:
            writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never the blank line
        before = routing()
        await until(lambda: routing() > before)  # routing is not held up meanwhile
        async with asyncio.timeout(WAIT_S):
            answers = await asyncio.gather(*(_read_or_reset(reader) for reader, _ in slow))
    finally:
        for _, writer in slow:
            writer.close()
    # Past the cap (64) closed at once, the rest at the timeout: none answered.
    assert answers == [b""] * 80
    assert (await get(broker, "/api/workers")).code == 200


async def test_a_flood_of_requests_is_served_from_snapshots(
    broker: Broker, routing: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert broker.dashboard is not None
    builds = 0
    real = broker.dashboard.pipelines

    def counted() -> dict[str, Any]:
        nonlocal builds
        builds += 1
        return real()

    monkeypatch.setattr(broker.dashboard, "pipelines", counted)
    _fresh_view_cache(broker)
    for _ in range(5):
        answers = await asyncio.gather(*(get(broker, "/api/pipelines") for _ in range(10)))
        assert all(a.code == 200 for a in answers)
    assert builds <= 1 + 5  # at most one per _VIEW_TTL_S, far fewer than 50
    before = routing()
    await until(lambda: routing() > before)


# --------------------------------------------------------------------------- the ring


def test_the_ring_is_bounded_and_its_quantiles_interpolate() -> None:
    from reasonbroker.core.board import Switchboard
    from reasonbroker.core.limits import Limits

    board = Switchboard(Limits())
    ring = Ring(size=3)
    for t in range(10):
        board.stats.accepted += 2
        ring.take(board, float(t))
    assert len(ring.samples) == 3
    series = ring.series()
    assert series["accepted_per_s"] == [2.0, 2.0]
    assert series["p50_ms"] == [None, None]
    # 10 jobs in (1, 2.5] ms: the median half way into that bucket.
    counts = [0] * 19
    counts[1] = 10
    assert quantile_ms(counts, 0.5) == pytest.approx(1.75)
    assert quantile_ms([0] * 19, 0.5) is None
    over = [0] * 19
    over[-1] = 1  # past the last bound: counted at it
    assert quantile_ms(over, 0.99) == 600_000.0


# --------------------------------------------------------------------------- a real browser


def _browser() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, or why there are none."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        return (
            "no chromium and chromium-driver here (.ci/run installs them with apt-get "
            "when it runs as root)"
        )
    return chromium, driver


@pytest.fixture
async def chrome(tmp_path: Path) -> AsyncIterator[Any]:
    """A headless Chromium under Selenium (skipped, saying why, where there is none).
    Selenium blocks: tests call it through asyncio.to_thread, so the broker's
    loop keeps serving meanwhile."""
    found = _browser()
    if isinstance(found, str):
        print(f"skipped: {found}")
        pytest.skip(found)
    chromium, driver_path = found
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(arg)
    service = Service(driver_path, log_output=str(tmp_path / "chromedriver.log"))
    browser = await asyncio.to_thread(webdriver.Chrome, options=options, service=service)
    try:
        yield browser
    finally:
        await asyncio.to_thread(browser.quit)


def _refreshed(browser: Any, at_least: int = 1) -> None:
    """Wait until the page's script has refreshed the views `at_least` times."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, WAIT_S, poll_frequency=0.1).until(
        lambda _: (
            int(browser.find_element(By.ID, "live").get_attribute("data-refreshes") or 0)
            >= at_least
        )
    )


async def test_a_real_browser_sees_the_dashboard_update(
    broker: Broker, worker: tuple[Worker, Gate], chrome: Any, tmp_path: Path
) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, gate = worker
    browser = chrome
    # The page re-renders its tables every second: an element read between its lookup and
    # its text may be replaced (stale). Each read is retried until it holds or WAIT_S.
    redrawn = (NoSuchElementException, StaleElementReferenceException)

    def cell(table: str, column: str) -> str:
        return str(browser.find_element(By.CSS_SELECTOR, f"#{table} tbody td.c-{column}").text)

    def wait_for(what: Callable[[], bool]) -> None:
        WebDriverWait(browser, WAIT_S, poll_frequency=0.1, ignored_exceptions=redrawn).until(
            lambda _: what()
        )

    def text_of(by: str, value: str) -> str:
        """An element's text once it has some (read again if the page redrew it)."""
        wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.1, ignored_exceptions=redrawn)
        return str(wait.until(lambda _: browser.find_element(by, value).text or None))

    async with Client(broker.address("client"), name="dash-browser-client") as client:
        for i in range(3):
            await client.run("echo", i)
        await asyncio.to_thread(browser.get, f"http://{broker.metrics_address}/")
        await asyncio.to_thread(_refreshed, browser)
        await asyncio.to_thread(wait_for, lambda: cell("workers", "name") == "dash-w1")
        await asyncio.to_thread(wait_for, lambda: cell("workers", "done") == "3")

        # More jobs, two held running: the page follows without a reload.
        for i in range(5):
            await client.run("echo", i)
        held = [await client.submit("slow", i) for i in range(2)]
        await gate.entered.wait()
        await asyncio.to_thread(wait_for, lambda: cell("workers", "done") == "8")
        await asyncio.to_thread(wait_for, lambda: cell("workers", "busy") == "2")
        await asyncio.to_thread(wait_for, lambda: cell("clients", "in_flight") == "2")
        pipelines = await asyncio.to_thread(text_of, By.ID, "pipelines")
        assert "echo" in pipelines and "slow" in pipelines
        gate.release.set()
        assert [await h for h in held] == [0, 1]
        await asyncio.to_thread(wait_for, lambda: cell("workers", "busy") == "0")
        await asyncio.to_thread(wait_for, lambda: text_of(By.ID, "total-ended") == "10")

        # A job looked up by its cookie (a detached one: its result is kept).
        detached = await client.submit("echo", {"shown": True}, detach=True)
        await until(lambda: detached.cookie.bytes in broker.board.retained)

        def look_up() -> None:
            box = browser.find_element(By.ID, "cookie")
            box.clear()
            box.send_keys(str(detached.cookie))
            browser.find_element(By.ID, "payload").click()
            browser.find_element(By.CSS_SELECTOR, "#lookup button").click()
            wait_for(lambda: bool(browser.find_elements(By.CSS_SELECTOR, "#job-found")))

        await asyncio.to_thread(look_up)
        job = await asyncio.to_thread(text_of, By.ID, "job-found")
        assert str(detached.cookie) in job
        assert "ended" in job and "OK" in job and '{"shown": true}' in job

        shot = tmp_path / "dashboard.png"
        assert await asyncio.to_thread(browser.save_screenshot, str(shot))
        assert shot.stat().st_size > 1000
        print(f"screenshot: {shot}")


async def test_a_real_browser_logs_in_with_the_admin_token(chrome: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait

    async with Broker(_config(tokens=True)) as broker:
        async with Worker(broker.address("worker"), handlers={"echo": echo}, name="behind-login"):
            await until(lambda: bool(broker.board.workers()))
            browser = chrome
            await asyncio.to_thread(browser.get, f"http://{broker.metrics_address}/")
            assert "behind-login" not in await asyncio.to_thread(lambda: browser.page_source)

            def log_in(token: str) -> None:
                form = browser.find_element(By.ID, "login")
                form.find_element(By.NAME, "token").send_keys(token)
                form.find_element(By.TAG_NAME, "button").click()
                # The script sets the cookie and reloads: wait for the new page.
                WebDriverWait(browser, WAIT_S).until(staleness_of(form))

            await asyncio.to_thread(log_in, "wrong-token")
            assert await asyncio.to_thread(lambda: browser.find_elements(By.ID, "login"))
            assert "behind-login" not in await asyncio.to_thread(lambda: browser.page_source)
            await asyncio.to_thread(log_in, ADMIN_TOKEN)
            await asyncio.to_thread(_refreshed, browser)
            name = await asyncio.to_thread(
                lambda: browser.find_element(By.CSS_SELECTOR, "#workers td.c-name").text
            )
            assert name == "behind-login"
