"""The `diffops` command line, operating side: the controller, status, history, generate, ray."""

from __future__ import annotations

import getpass
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import click
import httpx

from controller import logs
from controller.cli.common import fail, open_source, repo_option, state_dir_option, store_at, tracker_at, tracker_option, tracking_option
from controller.cli.output import choose, dump, output_option
from controller.cli.status_view import history_rows, history_text, status_json, status_text, with_runs
from controller.cli.tables import history_table, status_table
from controller.cli.terminal import is_terminal, print_rich
from controller.quality import summarize
from controller.source.credentials import private_dir, redact
from controller.state.feedback import feedback_rows
from controller.state.records import Command
from controller.state.samples import sample_rows
from controller.state.store import State, Store

if TYPE_CHECKING:
    from controller.apply.serve_config import ContainerRuntime, ProxyLocation

__all__ = ["COMMANDS", "DEFAULT_URL", "abort", "controller", "generate", "history", "open_store", "promote", "ray", "retry", "status"]

DEFAULT_URL = "http://127.0.0.1:8000"


def open_store(state_dir: Path, readonly: bool = True) -> Store:
    """The controller's store in `state_dir`; a clear error when no controller ever ran there."""
    path = state_dir / "state.db"
    if not path.exists():
        fail(f"no controller state in {state_dir}; start one with `diffops controller run --state-dir {state_dir}`")
    return store_at(path, readonly=readonly)


@click.group()
def controller() -> None:
    """The reconciling controller daemon."""


@controller.command("run")
@repo_option
@state_dir_option
@click.option("--branch", default=None, help="Branch to follow (default: the repository's HEAD).")
@click.option("--ray-address", default=None, metavar="URL|HOST:PORT",
              help="Ray dashboard URL (or GCS host:port) of a running cluster; without it a local head is started on 127.0.0.1.")
@click.option("--interval", default=10.0, show_default=True, help="Seconds between polls (remote URLs; local repos are also watched).")
@click.option("--http-port", default=8000, show_default=True, help="Port of Ray Serve's HTTP proxies.")
@click.option("--http-host", default="127.0.0.1", show_default=True,
              help="Address Serve's HTTP proxies listen on (0.0.0.0 on a cluster, to be reached from other hosts).")
@click.option("--proxy-location", type=click.Choice(["HeadOnly", "EveryNode"]), default="HeadOnly", show_default=True,
              help="Where Serve runs HTTP proxies: EveryNode on a cluster behind a load balancer.")
@click.option("--serve-url", default=None, metavar="URL",
              help="Serve's HTTP endpoint as the controller reaches it, to confirm router weights and read canary figures "
                   "(default: the --ray-address host, or 127.0.0.1, at --http-port).")
@click.option("--model-store", default=None, metavar="URI",
              help="Object store (s3://bucket/prefix, gs://, az://) that file:// models of the release repo are published to, "
                   "by digest, before their version starts; needed when the cluster's nodes are not this machine.")
@click.option("--container-runtime", type=click.Choice(["none", "podman"]), default="none", show_default=True,
              help="podman: each version's replicas run in the release's runtime.image (Ray's image_uri; podman on every node). "
                   "On KubeRay the worker group's image is the pin instead.")
@click.option("--num-gpus", type=int, default=None, help="GPUs the local head advertises (default: detected).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9464, show_default=True,
              help="Serve controller metrics for Prometheus on --metrics-host:PORT (0: off; never with --once, which exits "
                   "before a scrape); `diffops monitoring up` scrapes 9464.")
@click.option("--serving-metrics", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="off: routers and replicas record no request metrics (applied in place, no restart); "
                   "start phases, cache size and GPU samples are kept.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address the metrics endpoint listens on (0.0.0.0 in a pod, for probes and Prometheus).")
@click.option("--review-port", type=click.IntRange(0, 65535), default=9465, show_default=True,
              help="Serve the review page (rate the sampled outputs, blind to version) on 127.0.0.1:PORT (0: off; never with --once).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--allow-prune-all", is_flag=True, help="Allow a commit that removes every release file to delete every release.")
@click.option("--gate-python", default=None, metavar="PATH",
              help="Python with diffops installed on the Ray cluster, for gate jobs (default: this interpreter, right for a local head).")
@click.option("--allow-fault-injection", is_flag=True, help="Honour spec.faults (rollback drills); refused without this flag.")
@click.option("--revert-on-abort", type=click.Choice(["off", "branch", "tracked"]), default="off", show_default=True,
              help="After an automatic rollback commit a revert: on diffops/revert-<release>-<sha> (branch) or on --branch (tracked).")
@click.option("--require-signed-commits", is_flag=True,
              help="Reconcile the branch head only if it is signed by a trusted key (git verify-commit); "
                   "otherwise keep reconciling the last accepted commit and show the refusal in `diffops status`.")
@click.option("--allowed-signers", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Trust the SSH keys in FILE (git's gpg.ssh.allowedSignersFile format). "
                   "Without it or --gnupghome, the OpenPGP keys in $GNUPGHOME (else ~/.gnupg) are trusted.")
@click.option("--gnupghome", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Trust the OpenPGP keys in this GnuPG home (with --allowed-signers: both kinds are trusted).")
@tracking_option
@tracker_option
@click.option("--no-tracking", is_flag=True, help="Log no gate runs and no live quality to the tracking store.")
@click.option("--live-quality-interval", type=click.FloatRange(min=1), default=300.0, show_default=True, metavar="SECONDS",
              help="How often each version's feedback, ratings, CLIP score and NSFW rate are logged on its gate's tracking run.")
@click.option("--registry-interval", type=click.FloatRange(min=1), default=60.0, show_default=True, metavar="SECONDS",
              help="How often the models:/ URIs of serving releases are resolved again to report registry drift.")
@click.option("--once", is_flag=True, help="Reconcile once and exit (exit 1 if that failed or the head was refused).")
@click.option("--controller-id", default=None, metavar="ID",
              help="Owner mark on every Serve app this controller deploys; apps of other ids are never touched "
                   "(default: derived from the state dir, stable across restarts).")
@click.option("--cache-max-bytes", type=click.IntRange(min=0), default=None, metavar="BYTES",
              help="Evict least-recently-used models no recorded version pins until the model cache is under BYTES "
                   "(default: no limit).")
def controller_run(repo: str, state_dir: Path, branch: str | None, ray_address: str | None, interval: float, http_port: int,
                   http_host: str, proxy_location: ProxyLocation, serve_url: str | None, model_store: str | None,
                   container_runtime: ContainerRuntime, num_gpus: int | None, metrics_port: int, serving_metrics: str, metrics_host: str,
                   log_format: str, allow_prune_all: bool,
                   gate_python: str | None,
                   allow_fault_injection: bool, revert_on_abort: str, require_signed_commits: bool,
                   allowed_signers: Path | None, gnupghome: Path | None, tracking_uri: str | None, tracker: str, no_tracking: bool,
                   live_quality_interval: float, registry_interval: float, once: bool, controller_id: str | None,
                   cache_max_bytes: int | None, review_port: int) -> None:
    """Make Ray Serve match the releases at the branch head, continuously."""
    from controller.apply import ray_cluster
    from controller.apply.dashboard import cleartext_warning
    from controller.apply.model_store import Placement
    from controller.apply.serve_client import ServeClient
    from controller.apply.serve_config import RenderSettings, default_controller_id
    from controller.daemon import StateDirLocked, install_signal_handlers, lock_state_dir, run_loop
    from controller.gate.prefetch import RayPrefetch
    from controller.gate.runner import RayJobGate
    from controller.metrics import ControllerMetrics
    from controller.reconciler import Reconciler
    from controller.source.signatures import SignatureGate, Trust, TrustError, check_trust
    from controller.tick.registry import RegistryLink
    from controller.tracking.gate_runs import GateRuns
    from controller.tracking.live_quality import QualityLog
    from controller.tracking.mlflow_store import default_uri
    from controller.tracking.registry import ModelRegistry
    from serving.code_pin import fingerprint

    logs.configure(log_format)
    if (allowed_signers or gnupghome) and not require_signed_commits:
        fail("--allowed-signers and --gnupghome take effect only with --require-signed-commits; add it")
    if require_signed_commits and revert_on_abort == "tracked":
        fail("--revert-on-abort tracked commits an unsigned revert that --require-signed-commits would refuse; "
             "use --revert-on-abort branch and merge the revert as a signed commit")
    trust = Trust.from_flags(allowed_signers, gnupghome) if require_signed_commits else None
    if trust is not None:
        try:
            trusted = check_trust(trust)
        except TrustError as err:
            fail(str(err))
    private_dir(state_dir)  # 0700: the state file, mirrors and models are this user's
    try:
        lock = lock_state_dir(state_dir)
    except StateDirLocked as err:
        fail(str(err))
    store = store_at(state_dir / "state.db", readonly=False)  # a newer diffops's state file: refused before Ray starts
    source = open_source(repo, state_dir)
    try:
        if ray_address:
            ray_cluster.ensure_token()
            dashboard = ray_cluster.dashboard_url_for(ray_address)
        else:
            dashboard = ray_cluster.start_head(ray_cluster.RayHead(), num_gpus=num_gpus)
    except RuntimeError as err:
        fail(str(err))
    local = ray_cluster.is_local(dashboard)
    try:
        placement = Placement(model_store, local)
    except ValueError as err:
        fail(str(err))
    serve_url = serve_url or f"http://{urlsplit(dashboard).hostname if not local else '127.0.0.1'}:{http_port}"
    if warning := cleartext_warning(dashboard, ray_cluster.ensure_token()):
        click.echo(f"diffops: warning: {warning}", err=True)
    serve = ServeClient(dashboard, ray_cluster.ensure_token(), serve_url=serve_url)
    if not serve.alive():
        fail(f"Ray dashboard at {dashboard} is unreachable or refuses the token; check --ray-address and RAY_AUTH_MODE=token")
    metrics = ControllerMetrics()
    if metrics_port and not once:
        try:
            metrics.serve(metrics_port, metrics_host)
        except OSError as err:  # the port is taken (another controller, `make demo` beside a test) or the host is not ours
            fail(f"cannot serve metrics on {metrics_host}:{metrics_port} ({err.strerror}); "
                 "pass another --metrics-port, or 0 to turn them off")
    review = None
    if review_port and not once:
        from controller.review.server import ReviewServer

        try:  # each review counts in diffops_feedback_total like a user's feedback
            review = ReviewServer(state_dir, port=review_port,
                                  on_review=lambda release, entry: metrics.count_feedback(release, [entry])).start()
        except OSError as err:
            fail(f"cannot serve the review page on 127.0.0.1:{review_port} ({err.strerror}); "
                 "pass another --review-port, or 0 to turn it off")
    stop, wake = threading.Event(), threading.Event()
    settings = RenderSettings(repo=str(source.path), cache_dir=str(state_dir / "models"), http_host=http_host, http_port=http_port,
                              owner=controller_id or default_controller_id(str(state_dir)), placement=placement,
                              proxy_location=proxy_location, serving_code=fingerprint(), container_runtime=container_runtime,
                              serving_metrics=serving_metrics == "on")
    try:
        gate = RayJobGate(dashboard, ray_cluster.ensure_token(), python=gate_python, serving_code=fingerprint())
    except ValueError as err:  # DIFFOPS_GATE_START_DEADLINE_S / DIFFOPS_GATE_RESOURCES malformed
        fail(str(err))
    mlflow = tracker_at(state_dir, tracking_uri)  # models:/ URIs (and by default gate runs): opened on first use, off the loop
    runs = mlflow if tracker == "mlflow" else tracker_at(state_dir, tracking_uri, tracker)
    live = not no_tracking and tracker == "mlflow"  # live quality adds points to a logged run: MLflow's client only
    reconciler = Reconciler(source, store, serve, settings, branch=branch,
                            allow_prune_all=allow_prune_all, on_prepared=wake.set, metrics=metrics,
                            gate=gate, gate_dir=state_dir / "gate",
                            allow_faults=allow_fault_injection, revert_on_abort=revert_on_abort,
                            signatures=SignatureGate(Path(source.repo.git_dir), trust) if trust is not None else None,
                            cache_max_bytes=cache_max_bytes,
                            gate_runs=None if no_tracking else GateRuns(runs, fingerprint()),
                            registry=RegistryLink(ModelRegistry(mlflow), registry_interval),
                            quality_log=QualityLog(mlflow, live_quality_interval) if live else None,
                            prefetch=RayPrefetch(gate.dashboard, gate.python))
    where = "this machine" if local else f"the cluster at {dashboard}"
    published = f"; file:// models published to {model_store}" if model_store else ""
    tracked = "off" if no_tracking else redact(tracking_uri or default_uri(state_dir)) if tracker == "mlflow" else \
        f"{runs.where} (live quality not logged: MLflow only)"
    click.echo(f"diffops: controller on {source.url or source.path} (state {state_dir}, id {settings.owner}); Ray on {where}{published}; "
               f"serving at {serve_url}/<release>/generate; gate runs tracked in {tracked}", err=True)
    if trust is not None:
        click.echo(f"diffops: reconciling only a branch head signed by one of {trusted}; an unsigned or unknown-key head is refused",
                   err=True)
    try:
        if once:
            result = reconciler.reconcile()
            raise SystemExit(0 if result.ok and reconciler.state.controller.refused is None else 1)
        install_signal_handlers(stop, wake)
        git_dir = None if source.url else Path(source.repo.git_dir)
        run_loop(reconciler, interval_s=interval, git_dir=git_dir, stop=stop, wake=wake)
    finally:
        if review is not None:
            review.stop()
        reconciler.close()
        lock.release()


def status_inputs(store: Store) -> tuple[State, dict[tuple[str, str], dict[str, Any]], dict[tuple[str, str], dict[str, Any]]]:
    """What `diffops status` shows, read from the state file: the state, each version's gate report and quality."""
    state, gates = store.load(), store.gate_reports()
    quality = {(name, v["version"]): v for name in state.releases
               for v in summarize(feedback_rows(store.db, name), sample_rows(store.db, name))}
    return state, gates, quality


@click.command()
@state_dir_option
@output_option("text", "json", "yaml")
@click.option("--json", "as_json", is_flag=True, help="Same as -o json (the documented contract).")
@click.option("--watch", is_flag=True, help="Redraw every second until interrupted (json: one line per drawing; yaml: one document).")
def status(state_dir: Path, output: str, as_json: bool, watch: bool) -> None:
    """Every release: phase, message, versions, roles, weights and ready replicas.

    On a terminal the text is a table that fits its width; piped, plain lines.
    """
    store = open_store(state_dir)
    fmt = choose(output, as_json=as_json)
    while True:
        state, gates, quality = status_inputs(store)
        if fmt == "json":
            click.echo(dump(status_json(state, gates, quality), "json", compact=watch))
        elif fmt == "yaml":
            click.echo(("---\n" if watch else "") + dump(status_json(state, gates, quality), "yaml"))
        elif is_terminal(sys.stdout):
            if watch:
                click.clear()
            print_rich(status_table(status_json(state, gates, quality)))
        else:
            click.echo(status_text(state, gates, quality=quality))
        if not watch:
            return
        time.sleep(1)


@click.command()
@click.argument("release")
@state_dir_option
@output_option("text", "json", "yaml")
@click.option("--json", "as_json", is_flag=True, help="Same as -o json.")
def history(release: str, state_dir: Path, output: str, as_json: bool) -> None:
    """A release's rollouts: commit, version, outcome and duration, each with its timeline."""
    store = open_store(state_dir)
    gates = {version: report for (name, version), report in store.gate_reports(release).items() if name == release}
    rows = with_runs(history_rows(store.events(release)), gates)
    fmt = choose(output, as_json=as_json)
    if fmt != "text":
        click.echo(dump(rows, fmt))
    elif rows and is_terminal(sys.stdout):
        print_rich(history_table(release, rows))
    else:
        click.echo(history_text(release, rows))


@click.command()
@click.argument("release")
@click.argument("prompt")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, metavar="FILE",
              help="PNG file to write (a file here, not an output format: generate prints no state).")
@click.option("--url", default=lambda: os.environ.get("DIFFOPS_URL", DEFAULT_URL), show_default=f"$DIFFOPS_URL or {DEFAULT_URL}")
@click.option("--seed", type=int)
@click.option("--steps", type=int)
@click.option("--width", type=int)
@click.option("--height", type=int)
@click.option("--guidance-scale", type=float)
@click.option("--negative-prompt")
@click.option("--version", "pin", help="Send to this version (X-Diffops-Version), e.g. to preview a standby.")
@click.option("--timeout", default=300.0, show_default=True)
def generate(release: str, prompt: str, output: Path, url: str, seed: int | None, steps: int | None, width: int | None,
             height: int | None, guidance_scale: float | None, negative_prompt: str | None, pin: str | None, timeout: float) -> None:
    """Generate an image through the serving endpoint and write it as PNG."""
    body = {"prompt": prompt, "seed": seed, "steps": steps, "width": width, "height": height,
            "guidance_scale": guidance_scale, "negative_prompt": negative_prompt}
    headers = {"X-Diffops-Version": pin} if pin else {}
    started = time.monotonic()
    try:
        response = httpx.post(f"{url.rstrip('/')}/{release}/generate", json={k: v for k, v in body.items() if v is not None},
                              headers=headers, timeout=timeout)
    except httpx.HTTPError as err:
        fail(f"{url} unreachable ({type(err).__name__}); is the controller running (`make demo`)?")
    if response.status_code != 200:
        try:
            problem = response.json()  # an RFC 9457 problem document: the field at fault and what to do
            message = f"{problem.get('field', '')}: {problem.get('detail') or problem.get('title', '')}".strip(": ")
        except ValueError:
            message = response.text[:300]
        retry = f"; retry after {response.headers['Retry-After']}s" if "Retry-After" in response.headers else ""
        fail(f"{release}: HTTP {response.status_code}: {message}{retry}")
    output.write_bytes(response.content)
    click.echo(f"{output}: {len(response.content)} bytes from version {response.headers.get('X-Diffops-Version')} "
               f"(request {response.headers.get('X-Request-Id')}) in {time.monotonic() - started:.2f}s")


def manual(action: str, help_text: str) -> click.Command:
    @click.command(action, help=help_text)
    @click.argument("release")
    @state_dir_option
    def command(release: str, state_dir: Path, **options: bool) -> None:
        store = open_store(state_dir, readonly=False)
        if release not in store.load().releases:
            fail(f"no release {release!r} in {state_dir}")
        who = f"{getpass.getuser()}@{socket.gethostname()}"
        store.add_command(Command(release, action, who, time.time(), full=options.get("full", False)))  # type: ignore[arg-type]
        click.echo(f"{release}: {action} recorded for the controller (as {who}); `diffops status --watch` shows it take effect")

    if action == "promote":
        command = click.option("--full", is_flag=True, help="Skip every remaining step: straight to 100%.")(command)
    return command


promote = manual("promote", "Move a canary past its current pause (--full: to the end of its steps).")
abort = manual("abort", "Abort a rollout: all traffic back to the stable version; the version is held.")
retry = manual("retry", "Lift the hold on a failed or aborted version so the controller tries it again.")


@click.group()
def ray() -> None:
    """The local Ray head the controller starts (it outlives the controller)."""


@ray.command("start")
@click.option("--num-gpus", type=int, default=None, help="GPUs to advertise (default: detected).")
def ray_start(num_gpus: int | None) -> None:
    """Start the local Ray head on 127.0.0.1 with token auth (no-op when it runs)."""
    from controller.apply import ray_cluster

    logs.configure()
    try:
        click.echo(ray_cluster.start_head(ray_cluster.RayHead(), num_gpus=num_gpus))
    except RuntimeError as err:
        fail(str(err))


@ray.command("stop")
def ray_stop() -> None:
    """Stop the local Ray head: serving stops."""
    from controller.apply import ray_cluster

    raise SystemExit(ray_cluster.stop_head())


COMMANDS = [controller, status, history, generate, promote, abort, retry, ray]
