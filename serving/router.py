"""The per-release router: the HTTP ingress at `/<release>`, splitting traffic by weight.

Weights, limits and defaults live in the router's `user_config`, so the
controller moves traffic with a lightweight reconfigure (no replica restart).
The body is read as it streams in and refused with 413 once it passes the
4 MiB cap (a declared Content-Length over it before a byte is read).
A request is validated before any pipeline work (422 naming the field), sent
to one version app by weight (or to the version named in `X-Diffops-Version`),
and answered as PNG or JSON with `X-Diffops-Version` and `X-Request-Id`.
`GET /<release>` answers the weights and, per version, the figures the canary
analysis judges: only requests a router assigned by weight; requests pinned
with `X-Diffops-Version` (previews, steerable by any client) are counted apart,
under `pinned`; `GET /<release>/work` answers the replicas' busy seconds and images per version (cost
accounting). The release's routers scale out (`spec.ingress.replicas`); every
router replica sends its answers to the release's one `serving.tally.Tally`, so
whichever replica answers `GET /<release>` reports all of the release's traffic.
Backpressure from a full version queue becomes 503 with `Retry-After`; a
request whose replica dies under it is retried once. Every 4xx and 5xx is an
RFC 9457 problem details document (`application/problem+json`, built by
`serving.problems.problem`), whatever the request's `Accept` asks for. The
Serve proxy assigns `X-Request-Id` (or keeps the client's) and echoes it on
every response; the router reads it for bodies and logs.
`POST /<release>/feedback` rates an answer by its request id (`serving.feedback`): 202 naming the version that
drew it, 422 naming the field, 404 for an id the release never answered or answered past the retention window;
`GET /<release>/feedback?epoch=&after=` is the controller's read of the feedback held in the tally.
An answer whose image the safety checker flagged carries `X-Diffops-Nsfw` (or is a 451 under `block`); a drawn
sample of the answers goes to the release's scorer (`serving.sampling`, `serving.scorer`), read by the controller
with `GET /<release>/samples?epoch=&after=`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
import uuid
from collections.abc import Iterable
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from serving import code_pin, feedback, sampling
from serving.metrics import Ticker, outcome, recorder, serving_metrics
from serving.problems import PROBLEM_MEDIA_TYPE, ProblemDocument, ProblemKind, echo, problem
from serving.requests import RequestError, parse_request, read_body
from serving.scorer import Scorer
from serving.tally import Answer, Tally

__all__ = ["NSFW_HEADER", "REQUEST_ID_HEADER", "SCORER_CPUS", "TALLY_CPUS", "VERSION_HEADER", "Router", "build_router_app", "pick_version"]

log = logging.getLogger("ray.serve")

VERSION_HEADER = "X-Diffops-Version"
NSFW_HEADER = "X-Diffops-Nsfw"  # on an answer whose image the safety checker flagged: the action taken (flag, blur)
REQUEST_ID_HEADER = "X-Request-Id"
ECHO_CHARS = 80  # a client's header value is echoed in an error at most this long
TALLY_CPUS = 0.01  # the tally only appends to a deque
SCORER_CPUS = 0.1  # CLIP on sampled outputs, one at a time; the sample rates bound the work


def pick_version(weights: dict[str, int], pinned: str | None, rng: random.Random) -> str | None:
    """The version to serve a request: the pinned one if live, else a weighted draw."""
    if pinned is not None:
        return pinned if pinned in weights else None
    live = [(version, weight) for version, weight in weights.items() if weight > 0]
    if not live:
        return None
    return rng.choices([v for v, _ in live], weights=[w for _, w in live])[0]


class Router:
    attach_waits = (0.0, 0.2, 0.5)  # seconds between asking the tally for a request id before answering 404

    def __init__(self, release: str, tally: DeploymentHandle[Any] | None = None, scorer: DeploymentHandle[Any] | None = None):
        """`tally`: the release's shared `Tally` deployment; None (a router built in-process) keeps one of its own.
        `scorer`: the release's `serving.scorer.Scorer`, when it samples outputs (quality.clip, quality.review)."""
        code_pin.check(f"{release} router")  # the serving code the controller pinned, or refuse to start
        self.release = release
        self.tally, self.own_tally, self.scorer = tally, Tally(), scorer
        self.review_rate = self.clip_rate = 0.0
        self.weights: dict[str, int] = {}
        self.limits: dict[str, int] = {}
        self.defaults: dict[str, int] = {}
        self.retry_after_s = 1
        self.handles: dict[str, DeploymentHandle[Any]] = {}
        self.rng = random.Random()
        self.metrics = serving_metrics()
        self.inside = 0  # requests inside this router replica
        self.awaiting: dict[str, int] = {}  # per version: requests sent to it and not answered yet
        self.ticker = Ticker(f"router {release}", self._refresh_gauges).start()

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.weights = {str(k): int(v) for k, v in config.get("weights", {}).items()}
        self.limits = dict(config["limits"])
        self.defaults = dict(config["defaults"])
        self.retry_after_s = int(config.get("retry_after_s", 1))
        quality = config.get("quality") or {}
        self.review_rate, self.clip_rate = float(quality.get("review_rate", 0)), float(quality.get("clip_rate", 0))
        self.metrics = recorder(bool(config.get("metrics", True)))
        self.handles = {v: h for v, h in self.handles.items() if v in self.weights}
        log.info("router %s: weights now %s", self.release, self.weights)

    def _handle(self, version: str) -> DeploymentHandle[Any]:
        if version not in self.handles:
            self.handles[version] = serve.get_deployment_handle("Model", app_name=f"{self.release}--{version}")
        return self.handles[version]

    async def __call__(self, request: Request) -> Response:
        started = time.monotonic()
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex  # set by the Serve proxy
        self._in_flight(+1)
        try:
            response = await self._answer(request, request_id)
        except Exception as err:  # a bug in this router: still a problem document, never Serve's bare 500
            log.exception("router %s: failed request %s: %s; next: answering 500", self.release, request_id, type(err).__name__)
            detail = f"the router of {self.release} failed ({type(err).__name__}); the Serve logs name request {request_id}"
            response = self._error("internal-error", request_id, None, detail)
        finally:
            self._in_flight(-1)
        if not (request.method == "GET" and response.status_code == 200):  # the figures' read is no request to count
            self._count(response.headers.get(VERSION_HEADER), response.status_code, time.monotonic() - started)
        return response

    async def _answer(self, request: Request, request_id: str) -> Response:
        path = request.url.path.rstrip("/")
        if request.method == "GET" and (path.endswith(f"/{self.release}") or path.endswith("/versions")):
            try:
                since = float(request.query_params.get("since") or 0)
            except ValueError:
                return self._error("invalid-request", request_id, None, "epoch seconds expected", [("since", "epoch seconds expected")])
            return JSONResponse({"release": self.release, "weights": self.weights, "stats": await self.stats(since)})
        if request.method == "GET" and path.endswith(f"/{self.release}/work"):
            return JSONResponse({"release": self.release, **await self.work()})
        if path.endswith("/feedback"):
            return await self._feedback(request, request_id)
        if request.method == "GET" and path.endswith(f"/{self.release}/samples"):
            return await self._samples(request, request_id)
        if not path.endswith("/generate"):
            return self._error("not-found", request_id, None, f"use POST /{self.release}/generate")
        if request.method != "POST":
            return self._error("method-not-allowed", request_id, None, f"use POST /{self.release}/generate", headers={"Allow": "POST"})
        started = time.monotonic()  # the tally's seconds: from the body read to the version's answer
        try:
            raw = await read_body(request.stream(), request.headers.get("content-length"))
            params = parse_request(raw, self.limits, self.defaults)
        except RequestError as err:
            if err.status == 413:
                log.info("router %s: refused request %s: %s; next: nothing was read past the cap", self.release, request_id, err)
            return self._send(err.document(request_id), None)
        except ClientDisconnect:
            return self._error("client-disconnected", request_id, None, "the body ended early; send the whole request again")
        del raw  # up to 4 MiB; not held while the version generates
        pinned = request.headers.get(VERSION_HEADER)
        version = pick_version(self.weights, pinned, self.rng)
        if version is None:
            if pinned is not None:
                detail = f"{echo(pinned, ECHO_CHARS)!r} is not live; live versions: {sorted(self.weights)}"
                return self._error("unknown-version", request_id, None, detail, [(VERSION_HEADER, detail)])
            return self._error("no-version-serving", request_id, None, "retry shortly", headers=self._retry())
        preview = pinned is not None
        try:
            result = await self._generate(version, params, request_id)
        except BackPressureError:
            self._note((time.time(), version, False, time.monotonic() - started, False), preview)
            detail = f"version {version} queue is full; retry after {self.retry_after_s}s"
            return self._error("overloaded", request_id, version, detail, headers=self._retry())
        except DeploymentUnavailableError:
            self._note((time.time(), version, False, time.monotonic() - started, False), preview)
            return self._error("version-unavailable", request_id, version, f"{version} is not running", headers=self._retry())
        except Exception as err:  # the version failed to generate (not the request's fault)
            self._note((time.time(), version, False, time.monotonic() - started, False), preview)
            log.warning("router %s: version %s failed request %s: %s", self.release, version, request_id, err)
            return self._error("generation-failed", request_id, version, f"version {version} failed: {type(err).__name__}")
        seconds = time.monotonic() - started
        nsfw = [bool(flag) for flag in result.get("nsfw") or []]
        drawn = (request_id, feedback.generation(time.time(), version, params, result["params"]))
        self._note((time.time(), version, True, seconds, any(nsfw)), preview, drawn)
        headers = {VERSION_HEADER: version}
        if any(nsfw):
            if result.get("nsfw_action") == "block":
                detail = (f"{sum(nsfw)} of {len(nsfw)} images were withheld: the release's safety checker flagged them "
                          "(quality.safety.action: block); change the prompt")
                return self._error("content-blocked", request_id, version, detail)
            headers[NSFW_HEADER] = str(result.get("nsfw_action") or "flag")
        self._sample(request_id, version, params, result)
        if "application/json" in request.headers.get("accept", ""):
            images = [base64.b64encode(image).decode() for image in result["images"]]
            meta = {"release": self.release, "version": version, "request_id": request_id, **result["params"],
                    "seconds": round(seconds, 4), "batch_size": result["batch_size"], "nsfw": nsfw}
            return JSONResponse({"images": images, "metadata": meta}, headers=headers)
        return Response(result["images"][0], media_type="image/png", headers=headers)

    async def _generate(self, version: str, params: dict[str, Any], request_id: str) -> dict[str, Any]:
        """The version's answer; retried once if the replica died under it (generation has no side effects)."""
        self._waiting(version, +1)
        try:
            answer: dict[str, Any] = await self._handle(version).generate.remote(params)
        except RayActorError as err:
            log.warning("router %s: a replica of %s died during request %s (%s); next: retry it once",
                        self.release, version, request_id, type(err).__name__)
            answer = await self._handle(version).generate.remote(params)
        finally:
            self._waiting(version, -1)
        return answer

    def _note(self, answer: Answer, preview: bool, drawn: tuple[str, feedback.Entry] | None = None) -> None:
        """Send an answer to the release's tally, with what drew it when it served (kept for feedback on that request
        id); one call, never waited on (a request does not pay for the bookkeeping)."""
        drawn = drawn if drawn is not None and feedback.REQUEST_ID.fullmatch(drawn[0]) else None
        if self.tally is None:
            self.own_tally.answered(answer, preview, drawn)
        else:
            self.tally.answered.remote(answer, preview, drawn)

    def _sample(self, request_id: str, version: str, params: dict[str, Any], result: dict[str, Any]) -> None:
        """Send a drawn sample of the answer to the release's scorer; never waited on (scoring is off the request path)."""
        review, score = sampling.draw(self.rng, self.review_rate, self.clip_rate)
        if self.scorer is not None and (review or score) and result.get("images"):
            self.scorer.take.remote(sampling.sample(request_id, version, params, result, review, score))

    async def _samples(self, request: Request, request_id: str) -> Response:
        """The controller's read of the samples the scorer holds (`serving.scorer.SampleBook.since`)."""
        if self.scorer is None:
            return self._error("not-found", request_id, None, f"{self.release} samples no outputs (quality.review, quality.clip unset)")
        try:
            after, limit = int(request.query_params.get("after") or 0), int(request.query_params.get("limit") or 200)
        except ValueError:
            return self._error("invalid-request", request_id, None, "whole numbers expected", [("after", "whole numbers expected")])
        page: dict[str, Any] = await self.scorer.samples_since.remote(request.query_params.get("epoch"), after, limit)
        return JSONResponse(page)

    async def _tally(self, method: str, *args: Any) -> Any:
        return getattr(self.own_tally, method)(*args) if self.tally is None else await getattr(self.tally, method).remote(*args)

    async def _feedback(self, request: Request, request_id: str) -> Response:
        """POST: attach a feedback to the answer it names (202); GET: the feedback held for the controller to read."""
        if request.method == "GET":
            try:
                after, limit = int(request.query_params.get("after") or 0), int(request.query_params.get("limit") or 1000)
            except ValueError:
                return self._error("invalid-request", request_id, None, "whole numbers expected", [("after", "whole numbers expected")])
            return JSONResponse(await self._tally("feedback_since", request.query_params.get("epoch"), after, limit))
        if request.method != "POST":
            return self._error("method-not-allowed", request_id, None, f"use POST /{self.release}/feedback", headers={"Allow": "GET, POST"})
        try:
            body = feedback.parse_feedback(await read_body(request.stream(), request.headers.get("content-length"),
                                                           feedback.MAX_FEEDBACK_BYTES))
        except RequestError as err:
            return self._send(err.document(request_id), None)
        except ClientDisconnect:
            return self._error("client-disconnected", request_id, None, "the body ended early; send the whole feedback again")
        client = feedback.client_key(request.headers.get(feedback.CLIENT_HEADER), request.headers.get("x-forwarded-for"),
                                     request.client.host if request.client else None)
        entry = None
        for wait in self.attach_waits:  # an answer sent moments ago may still be on its way to the tally
            await asyncio.sleep(wait)
            entry = await self._tally("attach", body["request_id"], client, body, time.time())
            if entry is not None:
                break
        if entry is None:
            detail = (f"{self.release} never answered request {body['request_id']!r}, or answered it longer ago than feedback "
                      "is kept (24 h unless configured); send the X-Request-Id of a recent generate answer")
            return self._error("not-found", request_id, None, detail, [("request_id", detail)])
        return JSONResponse({"release": self.release, "request_id": body["request_id"], "version": entry["version"],
                             "status": "accepted"}, status_code=202, headers={VERSION_HEADER: entry["version"]})

    async def stats(self, since: float) -> dict[str, dict[str, Any]]:
        """Every router replica's answers since `since`, per version (`serving.tally.window_stats`)."""
        if self.tally is None:
            return self.own_tally.stats(since)
        stats: dict[str, dict[str, Any]] = await self.tally.stats.remote(since)
        return stats

    async def work(self) -> dict[str, Any]:
        """The replicas' busy seconds and images per version (`serving.tally.Tally.work_totals`)."""
        if self.tally is None:
            return self.own_tally.work_totals()
        totals: dict[str, Any] = await self.tally.work_totals.remote()
        return totals

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}

    def _count(self, version: str | None, code: int, seconds: float) -> None:
        """An answer: counted by status code, its end-to-end latency by outcome (`version` none: no version answered)."""
        tags = {"release": self.release, "version": version or "none"}
        self.metrics["requests"].inc(tags={**tags, "code": str(code)})
        self.metrics["latency"].observe(seconds, tags={**tags, "outcome": outcome(code)})

    def _in_flight(self, change: int) -> None:
        """Requests inside this router replica (version none: most are not assigned one yet)."""
        self.inside += change
        self.metrics["in_flight"].set(self.inside, tags={"release": self.release, "version": "none", "where": "router"})

    def _waiting(self, version: str, change: int) -> None:
        """Requests this router replica sent to `version` and awaits (queued for a replica slot or inside one)."""
        self.awaiting[version] = self.awaiting.get(version, 0) + change
        self.metrics["queue_length"].set(self.awaiting[version], tags={"release": self.release, "version": version, "where": "router"})

    def _refresh_gauges(self) -> None:
        """Both gauges again, read-only on the ticker's thread (an idle router sets none, and Ray drops a gauge not set
        for a while): every live version's queue, 0 when nothing awaits it."""
        tags = {"release": self.release, "where": "router"}
        self.metrics["in_flight"].set(self.inside, tags={**tags, "version": "none"})
        awaiting = self.awaiting.copy()  # one atomic copy: the event loop changes it meanwhile
        for version in {*self.weights.copy(), *awaiting}:
            self.metrics["queue_length"].set(awaiting.get(version, 0), tags={**tags, "version": version})

    def _error(self, kind: ProblemKind, request_id: str, version: str | None, detail: str,
               errors: Iterable[tuple[str, str]] = (), headers: dict[str, str] | None = None) -> Response:
        return self._send(problem(kind, detail, request_id, list(errors)), version, headers)

    def _send(self, document: ProblemDocument, version: str | None, headers: dict[str, str] | None = None) -> Response:
        """Answer a problem document, typed application/problem+json whatever `Accept` asked (counted in `__call__`)."""
        out = dict(headers or {})
        if version:
            out[VERSION_HEADER] = version
        return JSONResponse(document, status_code=document["status"], headers=out, media_type=PROBLEM_MEDIA_TYPE)


def build_router_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder named in the rendered config (`serving.router:build_router_app`): the routers (the
    ingress, `spec.ingress.replicas` of them) and the release's one tally they all report to."""
    retention = float(args.get("feedback_retention_s") or feedback.RETENTION_S)
    tally = serve.deployment(name="Tally", num_replicas=1, ray_actor_options={"num_cpus": TALLY_CPUS})(Tally).bind(retention)
    scorer = None
    if args.get("scorer"):
        scorer = serve.deployment(name="Scorer", num_replicas=1, ray_actor_options={"num_cpus": SCORER_CPUS})(Scorer).bind(args["release"])
    return serve.deployment(name="Router")(Router).bind(args["release"], tally, scorer)
