"""``/models``: the base models jobs can name on this server."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentOwner, SettingsDep
from shared.schemas import BaseModelList, BaseModelObject
from shared.services.base_models import list_base_models

router = APIRouter(tags=["models"])


@router.get("/models", response_model=BaseModelList)
def list_models(_owner: CurrentOwner, settings: SettingsDep) -> BaseModelList:
    """Base models: parameter count, context length, chat template; plus the hub allow-list."""
    return BaseModelList(
        data=[BaseModelObject.model_validate(m) for m in list_base_models(settings)],
        allowed_hub_models=settings.allowed_hub_models,
    )
