"""Ray placement and launch: one placement-group bundle and one actor per stage, wired over gRPC.

Ray decides where stages live and keeps their processes; activations never pass through Ray:
each actor runs a StageWorker whose gRPC server talks to its neighbours directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import ray
from ray.util.placement_group import NODE_ID_LABEL_KEY, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from stagecoach.cluster.backends import link_security, stage_plans
from stagecoach.cluster.config import ClusterConfig
from stagecoach.cluster.grpc_pipeline import GrpcPipeline
from stagecoach.cluster.ray_cluster import (
    check_resources,
    cluster_gpus,
    coordinator_host,
    placement_bundle,
    reachable,
    resolve_strategy,
)
from stagecoach.errors import ConfigError, PipelineError, StagecoachError
from stagecoach.proto.control import Loaded, Wiring
from stagecoach.proto.types import LayerRange
from stagecoach.stage.worker import StagePlan, StageWorker

log = logging.getLogger(__name__)

LOAD_LOG_EVERY_S = 5.0
SPARE_READY_S = 10.0  # for a one-bundle group on a spare node to be placed


@ray.remote(max_concurrency=2)  # load_progress() answers while load() runs
class StageActor(StageWorker):
    """A StageWorker in a Ray worker process (see proto.control.StageControl). The worker is built by load(), so that
    what its construction refuses comes back as that call's error, not as the actor's death."""

    def __init__(self, plan: StagePlan) -> None:
        self.plan, self.server, self.service, self.loaded_bytes, self.weight_bytes = plan, None, None, 0, 0

    def load(self) -> Loaded:
        super().__init__(self.plan, node_id=ray.get_runtime_context().get_node_id())
        return super().load()


class RayStage:
    """A stage actor's handle as a `StageControl`: each call waits for its answer within the pipeline's deadline of the
    moment (`timeout()`), and an error names the stage and what it was asked to do."""

    def __init__(self, actor, index: int, timeout: Callable[[], float]) -> None:
        self.actor, self.index, self.timeout = actor, index, timeout

    def _get(self, ref, what: str, timeout: float | None = None):
        timeout = self.timeout() if timeout is None else timeout
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(f"stage {self.index} did not {what} within {timeout:g} s") from None
        except ray.exceptions.RayError as e:
            cause = _unwrap(e)
            if isinstance(cause, StagecoachError):
                raise type(cause)(str(cause)) from None
            raise ConfigError(f"stage {self.index} failed to {what}: {cause}") from None

    def load(self) -> Loaded:
        return self._get(self.actor.load.remote(), "load")

    def load_progress(self) -> tuple[int, int]:
        return self._get(self.actor.load_progress.remote(), "report its loading", timeout=5)

    def start(self, num_blocks: int) -> str:
        return self._get(self.actor.start.remote(num_blocks), "start its server")

    def connect(self, wiring: Wiring) -> None:
        self._get(self.actor.connect.remote(wiring), "connect")

    def fence(self, min_batch_id: int) -> None:
        self._get(self.actor.fence.remote(min_batch_id), "fence off older microbatches")

    def check_layers(self, layers: LayerRange, min_blocks: int) -> None:
        self._get(self.actor.check_layers.remote(layers, min_blocks), "check its new layers")

    def set_layers(self, layers: LayerRange, min_batch_id: int) -> Loaded:
        return self._get(self.actor.set_layers.remote(layers, min_batch_id), "change its layers")

    def resize(self, num_blocks: int, min_batch_id: int) -> None:
        self._get(self.actor.resize.remote(num_blocks, min_batch_id), "size its KV cache")

    def stop(self) -> None:
        self._get(self.actor.stop.remote(), "stop", timeout=10)


def _unwrap(error: Exception) -> Exception:
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else error


class RayPipeline(GrpcPipeline):
    """Stages as Ray actors pinned to placement-group bundles; the coordinator runs in this process."""

    def __init__(self, config: ClusterConfig, ranges: list[LayerRange]) -> None:
        p, t = config.pipeline, config.transport
        gpus = p.gpus_per_stage if p.gpus_per_stage is not None else (1.0 if cluster_gpus() > 0 else 0.0)
        self.strategy = resolve_strategy(p.placement, gpus)
        check_resources(len(ranges), p.cpus_per_stage, gpus, self.strategy)
        host = t.host or coordinator_host(p.ray_address)
        # The token reaches the stages as an actor argument, over Ray's own (authenticated) control plane.
        security = link_security(config)
        super().__init__(host, 0, t.max_message_mb * 2**20, security, heartbeat_timeout_s=p.heartbeat_timeout_s)
        self.ready_timeout_s = p.ready_timeout_s
        self._call_timeout_s = p.ready_timeout_s  # while recovering: no longer than the recovery may take
        self._recovery_timeout_s = p.recovery_timeout_s
        self._cpus, self._gpus = p.cpus_per_stage, gpus
        self.moved: dict[int, object] = {}  # stage index → the one-bundle placement group it moved to (off a lost node)
        self.fenced: list = []  # actors replaced while unreachable: killed again until Ray has them gone
        self._plans = stage_plans(config, ranges, security.token)
        self.controls: list[RayStage] = []
        self.pg = None
        try:
            self._place()
            self.controls = [self._new_stage(i) for i in range(len(ranges))]
            self._bring_up(self._load_with_progress())
        except BaseException:
            self.shutdown()
            raise

    def _place(self) -> None:
        timeout = self.ready_timeout_s
        self.pg = placement_group(
            [placement_bundle(self._cpus, self._gpus) for _ in self._plans], strategy=self.strategy
        )
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout)
        if not ready:
            raise ConfigError(
                f"the placement group for {len(self._plans)} stages ({self.strategy}, {self._gpus:g} GPU + {self._cpus:g} CPU each) "
                f"was not placed within {timeout:g} s; the cluster has {cluster_gpus():g} GPUs on {len(ray.nodes())} nodes"
            )

    def _new_stage(self, index: int) -> RayStage:
        """Stage `index`'s actor on its bundle (the pipeline's bundle `index`, or the group it moved to), as a StageControl."""
        pg, bundle = (self.moved[index], 0) if index in self.moved else (self.pg, index)
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)
        actor = StageActor.options(num_cpus=self._cpus, num_gpus=self._gpus, scheduling_strategy=strategy).remote(
            self._plans[index]
        )
        return RayStage(actor, index, lambda: self._call_timeout_s)

    def reconfigure(self, min_batch_id: int, target: list[LayerRange] | None = None, min_blocks: int = 1) -> None:
        """GrpcPipeline's reconfiguration, each call bounded by the recovery's deadline so that a stage that cannot
        come back fails the attempt (and is tried again) instead of holding it for ready_timeout_s."""
        self._kill_fenced()
        self._call_timeout_s = min(self.ready_timeout_s, self._recovery_timeout_s)
        try:
            super().reconfigure(min_batch_id, target, min_blocks)
        finally:
            self._call_timeout_s = self.ready_timeout_s

    def health(self) -> list:
        self._kill_fenced()
        return super().health()

    def _kill_fenced(self) -> None:
        """Kills again every actor replaced while unreachable: a kill sent across a cut link may never have landed."""
        for actor in self.fenced:
            ray.kill(actor, no_restart=True)

    def _replace(self, dead: list[int], layers: list[LayerRange]) -> None:
        """A new actor for each dead stage, to load layers[i]: on its own bundle when its node still answers (the process
        died); off the node when the node is lost or unreachable (a silent link): on the pipeline's bundle where Ray
        re-placed it, else on a spare node. With neither, PipelineError: the recovery tries again later."""
        nodes = {n["NodeID"]: n for n in ray.nodes()}
        for i in dead:
            old = self.controls[i].actor
            ray.kill(old, no_restart=True)
            lost = self.stages[i].node_id if i < len(self.stages) else ""
            if lost and not reachable(nodes.get(lost)):
                self.fenced.append(old)  # it may come back with the link: never wired in again, killed until gone
                self._move(i, lost, nodes)
            self._plans[i].layer_start, self._plans[i].layer_end = layers[i]
            self.controls[i] = self._new_stage(i)

    def _move(self, index: int, lost: str, nodes: dict[str, dict]) -> None:
        """Points stage `index` at a bundle on a live, reachable node other than `lost`."""
        bundle_node = ray.util.placement_group_table(self.pg)["bundles_to_node_id"].get(index)
        if bundle_node and bundle_node != lost and reachable(nodes.get(bundle_node)):
            log.warning(
                "stage %d: its node %s is lost; back on its own bundle, which Ray placed on %s",
                index,
                lost[:8],
                nodes[bundle_node]["NodeManagerAddress"],
            )
            self._drop_moved(index)
            return
        busy = {s.node_id for s in self.stages} | {lost}
        for node_id, node in nodes.items():
            res = node.get("Resources", {})
            if (
                node_id in busy
                or res.get("GPU", 0) < self._gpus
                or res.get("CPU", 0) < self._cpus
                or not reachable(node)
            ):
                continue
            # A one-bundle group pinned to the spare: reserved before the stage loads, and released on its own.
            pg = placement_group(
                [placement_bundle(self._cpus, self._gpus)],
                strategy="STRICT_PACK",
                bundle_label_selector=[{NODE_ID_LABEL_KEY: node_id}],
            )
            ready, _ = ray.wait([pg.ready()], timeout=SPARE_READY_S)
            if not ready:
                remove_placement_group(pg)  # its resources are taken after all
                continue
            log.warning(
                "stage %d: its node %s is lost or unreachable; moving it to spare node %s",
                index,
                lost[:8],
                node["NodeManagerAddress"],
            )
            self._drop_moved(index)
            self.moved[index] = pg
            return
        raise PipelineError(
            f"stage {index}'s node {nodes.get(lost, {}).get('NodeManagerAddress', lost[:8])} is lost or unreachable, "
            f"and no spare node (alive, reachable, {self._gpus:g} GPU + {self._cpus:g} CPU free) can take the stage"
        )

    def _drop_moved(self, index: int) -> None:
        pg = self.moved.pop(index, None)
        if pg is not None:
            remove_placement_group(pg)

    def _load_with_progress(self) -> list[Loaded]:
        """Loads every stage (each within ready_timeout_s), showing each stage's bytes loaded (a 32B stage takes minutes)."""
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        columns = (
            TextColumn("stage {task.fields[stage]} weights"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TimeElapsedColumn(),
        )
        with (
            ThreadPoolExecutor(len(self.controls)) as pool,
            Progress(*columns, console=console, transient=not console.is_terminal) as bar,
        ):
            loads = [pool.submit(control.load) for control in self.controls]
            tasks = [bar.add_task("", stage=i, total=None) for i in range(len(loads))]
            next_line = time.monotonic() + LOAD_LOG_EVERY_S
            while not all(f.done() for f in loads):
                time.sleep(0.5)
                progress = []
                for task, control in zip(tasks, self.controls, strict=False):
                    try:
                        done, total = control.load_progress()
                    except StagecoachError:
                        continue  # the load itself reports what went wrong
                    bar.update(task, completed=done, total=total or None)
                    progress.append(f"stage {len(progress)}: {done / 1e9:.2f}/{total / 1e9:.2f} GB")
                if not console.is_terminal and time.monotonic() >= next_line:
                    # A log file gets a line now and then instead of a redrawn bar.
                    log.warning("loading weights: %s", ", ".join(progress))
                    next_line = time.monotonic() + LOAD_LOG_EVERY_S
        results = [f.result() for f in loads]
        for i, r in enumerate(results):
            formats = ", ".join(f"{fmt} {n / 1e9:.2f}" for fmt, n in sorted(r.formats.items()))
            log.warning(
                "stage %d loaded %.2f GB of weights on %s (GB by format: %s)",
                i,
                r.weight_bytes / 1e9,
                r.device,
                formats,
            )
        return results

    def shutdown(self) -> None:
        for control in self.controls:
            try:
                control.stop()
            except StagecoachError:
                pass  # already gone: nothing of it left to stop
            ray.kill(control.actor)
        self.controls = []
        self._kill_fenced()
        self.fenced = []
        for index in list(self.moved):
            self._drop_moved(index)
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        super().shutdown()
