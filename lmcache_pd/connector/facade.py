"""vLLM KV connector of lmcache-pd: load it with

    --kv-transfer-config '{"kv_connector": "PDConnector",
                           "kv_connector_module_path": "lmcache_pd.connector",
                           "kv_role": "kv_producer",          # kv_consumer on decode
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"config_file": "pd.yaml", "instance": "prefill-0"}}'

``kv_connector_extra_config`` takes ``config_file`` (a path), ``config`` (the same content
inline: it is then on vLLM's command line and in its log, so keep passwords out of it) or
``config_env`` (the name of an environment variable holding it as JSON: what the launcher
uses), and ``instance`` (else LMCACHE_PD_INSTANCE). This facade only picks the role object
(prefill/decode x scheduler/worker, see scheduler_side.py and worker_side.py) and delegates;
importing it is cheap, because vLLM's API server imports it only to call classmethods.
Supported vLLM versions, and what differs between them, are in compat.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from lmcache_pd.connector.cpus import instance_wide

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["PDConnector"]

_EXTRA_KEYS = {"config_file", "config", "config_env", "instance"}


def load_settings(vllm_config: VllmConfig) -> tuple[Any, str, str]:
    """(PDConfig, instance name, 'prefill'|'decode') from kv_connector_extra_config."""
    import vllm

    from lmcache_pd.config import configure_logging, resolve_instance
    from lmcache_pd.connector.compat import check_supported
    from lmcache_pd.errors import ConfigError

    check_supported(vllm.__version__)
    ktc = vllm_config.kv_transfer_config
    extra = dict(ktc.kv_connector_extra_config or {})
    cfg = config_of(extra)
    configure_logging(cfg.log_level)
    instance = resolve_instance(extra.get("instance"))
    role = cfg.role_of(instance)
    expected = "kv_producer" if role == "prefill" else "kv_consumer"
    if ktc.kv_role != expected:
        raise ConfigError(f"instance {instance!r} is a {role} instance: set kv_role to {expected!r} "
                          f"(got {ktc.kv_role!r})", field="kv_role")
    return cfg, instance, role


def config_of(extra: dict[str, Any]) -> Any:
    """The deployment's PDConfig that ``kv_connector_extra_config`` points to."""
    from lmcache_pd.config import config_from_dict, load_config
    from lmcache_pd.errors import ConfigError

    unknown = set(extra) - _EXTRA_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_EXTRA_KEYS)}",
                          field="kv_connector_extra_config")
    if "config_env" in extra:
        import json
        import os

        name = str(extra["config_env"])
        if name not in os.environ:
            raise ConfigError(f"the environment has no {name} (the launcher sets it)",
                              field="kv_connector_extra_config.config_env")
        try:
            data = json.loads(os.environ[name])
        except json.JSONDecodeError as e:
            raise ConfigError(f"{name} is not JSON: {e}", field="kv_connector_extra_config.config_env") from None
        cfg = config_from_dict(data, source=f"environment {name}")
    elif "config" in extra:
        cfg = config_from_dict(extra["config"], source="kv_connector_extra_config.config")
    else:
        cfg = load_config(extra.get("config_file"))
    return cfg


class PDConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config, role, kv_cache_config)
        cfg, instance, pd_role = load_settings(vllm_config)
        block_size = vllm_config.cache_config.block_size
        from lmcache_pd.connector import scheduler_side as s
        from lmcache_pd.connector import worker_side as w

        self._sched: s.SchedulerRole = s.SchedulerRole()
        self._worker: w.WorkerRole = w.WorkerRole()
        if role == KVConnectorRole.SCHEDULER:

            cls = s.PrefillScheduler if pd_role == "prefill" else s.DecodeScheduler
            self._sched = cls(cfg, instance=instance, block_size=block_size)
            loads = pd_role == "decode" or cfg.cache.enabled
            if loads and vllm_config.kv_transfer_config.kv_load_failure_policy != "recompute":
                import logging

                logging.getLogger(__name__).warning(
                    "kv_load_failure_policy is not 'recompute': a failed load (hand-off or cache) will fail "
                    "the request instead of being recomputed on this instance")
        else:
            cls_w = w.PrefillWorker if pd_role == "prefill" else w.DecodeWorker
            self._worker = cls_w(vllm_config, cfg, instance=instance)

    # --- classmethods (called without an instance, also in the API server) ----------------
    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        from lmcache_pd.connector.compat import required_kv_layout

        return required_kv_layout()

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # Layered hand-offs need vLLM's per-layer hooks, which a full CUDA graph skips. Only a
        # prefill instance sends them: a decode instance keeps its full graphs (its small batches
        # are where they pay).
        from lmcache_pd.config import resolve_instance

        try:
            extra = dict(extra_config or {})
            cfg = config_of(extra)
            return cfg.transport.layerwise and cfg.role_of(resolve_instance(extra.get("instance"))) == "prefill"
        except Exception:  # noqa: BLE001 - an unreadable config or a nameless instance fails the connector's start, with its field named
            return False

    @classmethod
    def supports_sleep_mode(cls, *args: Any, **kwargs: Any) -> bool:
        return False

    # --- scheduler side ---------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._sched.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._sched.request_finished(request, block_ids)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        # vLLM's prompt_tokens_cached_by_source metric: which tier (or the hand-off) supplied them.
        # Only vLLMs that have CacheHitSource call this (compat.py).
        from lmcache_pd.connector.compat import cache_hit_kinds

        by_name = self._sched.hit_sources(request, num_external_tokens)
        kinds = cache_hit_kinds()
        if not by_name or kinds is None:
            return super().get_external_cache_hit_sources(request, num_external_tokens)
        out: dict[Any, int] = {}
        for name, n in by_name.items():
            kind = kinds.get(name, kinds[""])
            out[kind] = out.get(kind, 0) + n
        return out

    # --- worker side ------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        with instance_wide(self._worker.cfg.instance(self._worker.instance).cpus):  # (cpus.py: why)
            self._worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._worker.before_forward(connector_metadata)  # the step starts: before its forward

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._worker.start_load_kv(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass  # whole-request async loads: nothing to wait for per layer

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        self._worker.save_kv_layer(layer_name, self._get_connector_metadata())  # a layered hand-off sends it now

    def wait_for_save(self) -> None:
        self._worker.wait_for_save()  # never waits: hand-offs hold their blocks (delay_free)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sending, recving, _ = self._worker.get_transfer_results(finished_req_ids)
        return sending or None, recving or None

    def get_transfer_results(self, finished_req_ids: set[str]):  # vLLM 0.32: failures as failed_recving
        from lmcache_pd.connector.compat import transfer_results

        sending, recving, failed = self._worker.get_transfer_results(finished_req_ids)
        self._worker.take_failed_blocks()  # reported as failed_recving instead
        return transfer_results(sending, recving, failed)

    def get_block_ids_with_load_errors(self) -> set[int]:  # vLLM 0.24: failures as their blocks
        return self._worker.take_failed_blocks()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._worker.build_worker_meta()

    def shutdown(self) -> None:
        self._worker.shutdown()
