"""The floor of the two-hop request path: a bare Ray Serve app, proxy → ingress deployment → echo deployment.

Deployed by `bench/router.py` beside the demo release on the bench's Serve (route
`/floor`) and called with an empty body, so its latency is what Serve's proxy and
two handle hops cost with nothing of ours in them. Replicas import it through the
`PYTHONPATH` its runtime_env names (the bench is not an installed package).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

CPUS = {"num_cpus": 0.1}


class Echo:
    async def __call__(self, body: bytes) -> bytes:
        return body


class Ingress:
    def __init__(self, echo: DeploymentHandle[Any]):
        self.echo = echo

    async def __call__(self, request: Request) -> Response:
        return Response(await self.echo.remote(await request.body()), media_type="application/octet-stream")


app = serve.deployment(ray_actor_options=CPUS)(Ingress).bind(serve.deployment(ray_actor_options=CPUS)(Echo).bind())
