"""Health check and Prometheus metrics (no API key: probes and scrapers call them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from api.errors import documented_errors
from api.gateway import Gateway


def build_health_router(get_gateway: Callable[[], Gateway]) -> APIRouter:
    router = APIRouter()

    def gateway() -> Gateway:
        return get_gateway()

    @router.get("/healthz", responses=documented_errors((503,)))
    async def healthz(gw: Gateway = Depends(gateway)) -> dict[str, Any]:
        placement = await gw.refresh_placement()
        return {"status": "ok", "router_version": gw.routing.version, "experts": sorted(placement)}

    @router.get("/metrics", responses={200: {"description": "Prometheus text format.",
                                             "content": {"text/plain": {"schema": {"type": "string"}}}},
                                       **documented_errors((503,))})
    async def metrics(gw: Gateway = Depends(gateway)) -> Response:
        # under Ray the totals of every ingress and pool replica (the MetricsHub), whichever replica answers
        return Response(await gw.export.render(), media_type="text/plain; version=0.0.4")

    return router
