"""Admin routes (Bearer MOE_ADMIN_TOKEN): experts, router versions, background jobs. Handlers that only touch
the registry (and reload the router) are plain `def`: FastAPI runs them in its thread pool, off the event loop."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.auth import check_admin
from api.errors import ADMIN_ERRORS, documented_errors
from api.gateway import Gateway
from core.errors import InvalidInputError
from experts.adapters import validate_expert_name
from pipelines import jobs
from pipelines.archive import unpack_adapter_archive
from registry import repository as repo
from registry.models import ExpertStatus


class RegisterExpert(BaseModel):
    name: str = Field(description="New expert name.")
    description: str = Field(default="", max_length=1000)
    data_path: str | None = Field(default=None, description="Server-side JSONL/CSV training file.")
    adapter_path: str | None = Field(default=None, description="Server-side peft adapter folder (safetensors).")
    prompts_path: str | None = Field(default=None, description="Extra JSONL of {'text'} routing prompts.")
    epochs: int = Field(default=3, ge=1, le=50)


class RetrainRouter(BaseModel):
    from_logs: bool = Field(default=False, description="Use feedback and forced requests as labels.")


def build_admin_router(get_gateway) -> APIRouter:
    # long: one short handler per admin endpoint, declared together so the router reads as the API
    router = APIRouter(prefix="/admin", tags=["admin"], responses=documented_errors(ADMIN_ERRORS))

    def admin(request: Request) -> Gateway:
        gateway = get_gateway()
        check_admin(request, gateway.settings)
        return gateway

    def _job(gw: Gateway, kind: str, message: str) -> str:
        with gw.sessions.begin() as session:
            return repo.create_job(session, kind, message).id

    def require_new_expert(gw: Gateway, name: str) -> None:
        with gw.sessions() as session:
            repo.require_new_expert(session, name, hint="")

    @router.get("/experts")
    def list_experts(gw: Gateway = Depends(admin)) -> list[dict[str, Any]]:
        with gw.sessions() as session:
            return [{"name": e.name, "status": e.status, "version": e.current_version, "description": e.description}
                    for e in repo.list_experts(session)]

    @router.post("/experts", status_code=202)
    def register(body: RegisterExpert, gw: Gateway = Depends(admin)) -> dict[str, str]:
        validate_expert_name(body.name)
        if (body.data_path is None) == (body.adapter_path is None):
            raise InvalidInputError("Give exactly one of data_path or adapter_path.")
        require_new_expert(gw, body.name)
        payload = gw.settings.payload()
        job_id = _job(gw, "register_expert", f"queued: {body.name}")
        if body.data_path is not None:
            jobs.launch(jobs.expert_job, payload, job_id, body.name, body.data_path, body.description, body.epochs,
                        body.prompts_path)
        else:
            jobs.launch(jobs.adapter_job, payload, job_id, body.name, body.adapter_path, body.description,
                        body.prompts_path)
        return {"job_id": job_id}

    def _set_status(gw: Gateway, name: str, status: ExpertStatus) -> dict[str, str]:
        with gw.sessions.begin() as session:
            repo.set_expert_status(session, name, status)
        gw.routing.refresh()
        return {"name": name, "status": status}

    @router.post("/experts/{name}/upload", status_code=202)
    async def upload(name: str, request: Request, description: str = "", gw: Gateway = Depends(admin)) -> dict:
        """Body: a .zip/.tar/.tar.gz of a peft LoRA folder. Checked member by member before anything is written."""
        validate_expert_name(name)
        await run_in_threadpool(require_new_expert, gw, name)
        data = await request.body()
        folder = gw.settings.home / "uploads" / uuid.uuid4().hex
        unpack_adapter_archive(data, folder, gw.settings.max_upload_bytes)
        job_id = await run_in_threadpool(_job, gw, "register_expert", f"queued: {name} (upload)")
        jobs.launch(jobs.adapter_job, gw.settings.payload(), job_id, name, str(folder), description, None)
        return {"job_id": job_id}

    @router.post("/experts/{name}/retire")
    def retire(name: str, gw: Gateway = Depends(admin)) -> dict[str, str]:
        return _set_status(gw, name, ExpertStatus.RETIRED)

    @router.post("/experts/{name}/activate")
    def activate(name: str, gw: Gateway = Depends(admin)) -> dict[str, str]:
        return _set_status(gw, name, ExpertStatus.ACTIVE)

    @router.get("/routers")
    def routers(gw: Gateway = Depends(admin)) -> list[dict[str, Any]]:
        with gw.sessions() as session:
            return [{"version": r.version, "status": r.status, "experts": r.experts,
                     "accuracy": r.metrics.get("accuracy")} for r in repo.list_routers(session)]

    @router.post("/routers/train", status_code=202)
    def train(body: RetrainRouter, gw: Gateway = Depends(admin)) -> dict[str, str]:
        job_id = _job(gw, "train_router", "queued")
        jobs.launch(jobs.router_job, gw.settings.payload(), job_id, body.from_logs)
        return {"job_id": job_id}

    @router.post("/routers/{version}/promote")
    def promote(version: int = PathParam(ge=1, le=2**31 - 1), gw: Gateway = Depends(admin)) -> dict[str, Any]:
        with gw.sessions.begin() as session:
            repo.promote_router(session, version)
        gw.routing.refresh()
        return {"active": gw.routing.version}

    @router.post("/routers/rollback")
    def rollback(gw: Gateway = Depends(admin)) -> dict[str, Any]:
        with gw.sessions.begin() as session:
            repo.rollback_router(session)
        gw.routing.refresh()
        return {"active": gw.routing.version}

    @router.get("/jobs/{job_id}")
    def job(job_id: str, gw: Gateway = Depends(admin)) -> dict[str, Any]:
        with gw.sessions() as session:
            j = repo.get_job(session, job_id)
            return {"id": j.id, "kind": j.kind, "status": j.status, "progress": j.progress, "message": j.message,
                    "result": j.result}

    return router
