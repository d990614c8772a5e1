"""Model and server configuration, validated with pydantic.

Every model folder holds a ``config.yaml``. Unknown keys are errors (``extra="forbid"``),
so a typo is reported with the file, the line and the field instead of being ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from fastserve.errors import ConfigError

MODEL_CONFIG_FILE = "config.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingConfig(_Strict):
    """How the native batcher forms batches (semantics follow Triton's dynamic batcher)."""

    max_batch_size: int = Field(32, ge=1, le=65536)
    """Most rows (first dimension) in one batch. 1 turns batching off."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Release a batch at once when the queued rows add up to one of these sizes."""
    max_queue_delay_us: int = Field(500, ge=0, le=10_000_000)
    """Longest time the oldest queued request waits for a batch to fill, in microseconds."""
    release_when_idle: bool = False
    """Release the queue at once, without waiting out the delay, when every open client
    connection has a request waiting on a batch: no one is left who could send the request
    the delay waits for (a closed loop of clients, e.g. one client at a time)."""
    max_queue_size: int = Field(1024, ge=1, le=1_000_000)
    """Requests queued at most; one more is refused at once with 503 and Retry-After."""
    queue_timeout_us: int = Field(0, ge=0, le=3_600_000_000)
    """Default deadline in the queue, in microseconds (0: none). A request's ``timeout``
    parameter overrides it. A request still queued at its deadline gets 503 and never runs."""
    priority_levels: int = Field(1, ge=1, le=16)
    """Number of priority levels; a request's ``priority`` parameter 1 is the highest."""
    default_priority: int = Field(0, ge=0)
    """Level of requests that give no priority (0: the lowest level)."""

    @model_validator(mode="after")
    def _check_sizes(self) -> BatchingConfig:
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise ValueError(
                    f"preferred batch size {size} is outside 1..max_batch_size "
                    f"({self.max_batch_size})"
                )
        if len(set(self.preferred_batch_sizes)) != len(self.preferred_batch_sizes):
            raise ValueError("preferred_batch_sizes has duplicates")
        if self.default_priority > self.priority_levels:
            raise ValueError(
                f"default_priority {self.default_priority} is above priority_levels "
                f"({self.priority_levels})"
            )
        return self

    def priority_index(self, priority: int) -> int:
        """Map a Triton-style priority (1 highest, 0 default) to the core's level (0 highest)."""
        if priority == 0:
            priority = self.default_priority or self.priority_levels
        return priority - 1


class OnnxRuntimeConfig(_Strict):
    """Settings of the onnxruntime sessions of a model."""

    execution_provider: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when onnxruntime has it and a CUDA device is present, else CPU."""
    intra_op_threads: int = Field(1, ge=0, le=256)
    """Threads inside one operator (0: onnxruntime's default, one per core)."""
    inter_op_threads: int = Field(1, ge=0, le=256)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"


class VersionPolicy(_Strict):
    """Which version folders are loaded (Triton's version policy). Give at most one of
    ``latest``, ``specific`` and ``all``; with none, the latest version is loaded."""

    latest: int | None = Field(None, ge=1, le=1024)
    """Load the highest N versions."""
    specific: tuple[int, ...] | None = Field(None, min_length=1, max_length=1024)
    """Load exactly these versions."""
    all: bool = False
    """Load every version folder."""

    @model_validator(mode="after")
    def _one_policy(self) -> VersionPolicy:
        given = [n for n, v in (("latest", self.latest), ("specific", self.specific)) if v]
        if self.all:
            given.append("all")
        if len(given) > 1:
            raise ValueError(f"give one of latest, specific and all, not {' and '.join(given)}")
        if self.specific is not None and any(v < 1 for v in self.specific):
            raise ValueError("versions are positive integers")
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions to load out of those ``available`` (ascending)."""
        if self.all:
            return sorted(available)
        if self.specific is not None:
            wanted = set(self.specific)
            return sorted(v for v in available if v in wanted)
        return sorted(available)[-(self.latest or 1) :]


class ShadowConfig(_Strict):
    """A candidate version that sees mirrored live traffic; the client never waits for it."""

    version: int = Field(ge=1)
    """The version mirrored to; loaded like the primary, whatever the version policy."""
    sample_rate: float = Field(1.0, ge=0.0, le=1.0)
    """Share of the primary's successful requests mirrored to the shadow."""
    max_pending: int = Field(64, ge=1, le=100_000)
    """Mirrored requests waiting or running at most; beyond it they are dropped, counted."""
    timeout_ms: int = Field(2000, ge=1, le=600_000)
    """A mirrored request the shadow has not answered by then counts as a shadow error."""


class ReviewConfig(_Strict):
    """What is recorded of the answers, and which ones a person should look at."""

    record_predictions: bool = True
    """Record every answer's prediction, so that feedback can be joined to it (accuracy).
    Costs the request path a little (see the README's figures); off, feedback is refused."""

    confidence_measure: Literal["max_probability", "margin", "entropy"] = "max_probability"
    """max_probability: the top class's probability; margin: top minus runner-up;
    entropy: 1 - H(p)/log(classes). Higher is surer for all three."""
    confidence_threshold: float | None = Field(None, ge=0.0, le=1.0)
    """A classifier's prediction with a row below this goes to the review queue (none: off)."""
    disagreement_sample_rate: float = Field(1.0, ge=0.0, le=1.0)
    """Share of shadow disagreements that go to the review queue."""
    max_pending: int = Field(10_000, ge=1, le=10_000_000)
    """Unlabelled items kept at most per model; more are not queued (counted)."""


class PromotionGate(_Strict):
    """What the shadow must show before ``promote`` makes it the primary (unless forced)."""

    min_compared: int = Field(100, ge=0)
    """Mirrored requests compared with the primary, at least."""
    min_agreement: float = Field(0.95, ge=0.0, le=1.0)
    """Classifiers: the share of compared requests with the same top-1 class, at least."""
    min_labelled: int = Field(0, ge=0)
    """Compared requests with feedback, at least, before accuracy is judged."""
    max_accuracy_drop: float = Field(0.0, ge=0.0, le=1.0)
    """Shadow accuracy on the labelled compared requests may be below the primary's by
    this much at most (0: at least as accurate)."""
    max_p99_regression: float = Field(0.25, ge=0.0)
    """The shadow's p99 latency may exceed the primary's by this fraction at most."""


class ImagePipeline(_Strict):
    """Raw or encoded images in, the model's float tensor out. A client may send ``input``
    as UINT8 ``[N, height, width, channels]`` (``[N, height, width]`` for one channel) of
    any size, or as BYTES ``[N]`` holding one JPEG or PNG file each (any sizes, decoded off
    the event loop). The native kernel resizes each image (bilinear) to the model input's
    height and width, normalizes ``(pixel / 255 - mean) / std`` per channel, lays it out as
    the model wants (CHW or HWC, from its shape) and writes FP32 or FP16 (the input's
    datatype). A request sending the model's own tensor passes through untouched."""

    input: str
    """The model input the pipeline feeds (a 4-D FP32 or FP16 input with fixed C, H, W)."""
    mean: tuple[float, ...] = Field(min_length=1, max_length=4)
    std: tuple[float, ...] = Field(min_length=1, max_length=4)
    aspect: Literal["stretch", "shorter_side"] = "stretch"
    """stretch: to exactly the model's size; shorter_side: scale the shorter side, crop the
    center."""
    max_decoded_pixels: int = Field(1 << 24, ge=1)
    """Pixels the encoded images of one request may decode to, all together (read from
    their headers before anything is decoded): a small file cannot claim gigabytes."""

    @model_validator(mode="after")
    def _check_channels(self) -> ImagePipeline:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std need one value per channel each")
        if any(not s > 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class NumericFeature(_Strict):
    """A number column: filled when missing, then scaled."""

    name: str = Field(min_length=1)
    scale: Literal["none", "standard", "minmax"] = "none"
    """standard: (x - mean) / std; minmax: (x - min) / (max - min); the statistics are the
    feature's in the version's ``reference.json`` (a zero std or range divides by 1, as
    scikit-learn's scalers do)."""
    fill: float | Literal["mean", "median", "min", "max"] | None = None
    """What a missing value (NaN, or the feature absent from the request) becomes, before
    scaling: a number, or a statistic of the reference. None: a missing value is a 400."""


class CategoricalFeature(_Strict):
    """A categorical column: its value's position in ``categories``, as one column (index)
    or one column per category (onehot)."""

    name: str = Field(min_length=1)
    categories: tuple[StrictStr, ...] | tuple[StrictInt, ...] = Field(min_length=1)
    """The vocabulary: strings (sent as BYTES) or integers (sent as an integer datatype)."""
    encode: Literal["onehot", "index"] = "onehot"
    unknown: Literal["error", "ignore"] = "error"
    """A value not in ``categories``: error (a 400 naming the feature, row and value), or
    ignore (onehot: all zeros; index: ``unknown_value``)."""
    unknown_value: float = -1.0
    fill: StrictStr | StrictInt | None = None
    """The category a missing value (an empty string, or the feature absent) becomes; None:
    a missing value is a 400."""

    @model_validator(mode="after")
    def _check_vocabulary(self) -> CategoricalFeature:
        if len(set(self.categories)) != len(self.categories):
            raise ValueError("categories must be distinct")
        if self.fill is not None and self.fill not in self.categories:
            raise ValueError(f"fill {self.fill!r} is not one of the categories")
        return self


def _feature_kind(value: Any) -> str:
    """Which kind of feature a config entry is: one with ``categories`` is categorical."""
    if isinstance(value, dict):
        return "categorical" if "categories" in value else "numeric"
    return "categorical" if isinstance(value, CategoricalFeature) else "numeric"


TabularFeature = Annotated[
    Annotated[NumericFeature, Tag("numeric")] | Annotated[CategoricalFeature, Tag("categorical")],
    Discriminator(_feature_kind),
]


class TabularPipeline(_Strict):
    """Feature columns by name in, the model's 2-D float input out: each feature, in the
    order listed, writes one column (numbers, index encoding) or one per category (onehot)
    of ``input``, in one native pass per row."""

    input: str
    """The model input the pipeline feeds: 2-D FP32 or FP64, as wide as the features'
    columns together."""
    features: tuple[TabularFeature, ...]

    @model_validator(mode="after")
    def _check_names(self) -> TabularPipeline:
        if not self.features:
            raise ValueError("features: at least one is needed")
        names = [f.name for f in self.features]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"features listed twice: {', '.join(repeated)}")
        return self


class SequencePipeline(_Strict):
    """Variable-length sequences in, padded batches out: requests whose ``inputs`` differ in
    length (dimension 1) share a batch; the native batcher pads every row to the batch's
    longest (or to ``length``) with ``pad`` and writes the attention mask into ``mask``."""

    inputs: tuple[str, ...] = Field(min_length=1)
    """Model inputs ``[batch, length, ...]`` of variable length; a request's inputs share
    their length."""
    pad: float | dict[str, float] = 0.0
    """The value written past a row's end: one for all inputs, or one per input."""
    mask: str | None = None
    """The model input that gets the attention mask (1 at a value, 0 in padding); clients
    do not send it."""
    length: int | None = Field(None, ge=1)
    """Pad or truncate every row to this length (default: the batch's longest row, or the
    model's own fixed length)."""
    max_length: int | None = Field(None, ge=1)
    """Truncate rows longer than this (with no fixed ``length``)."""

    @model_validator(mode="after")
    def _check(self) -> SequencePipeline:
        if len(set(self.inputs)) != len(self.inputs):
            raise ValueError("inputs must be distinct")
        if self.mask is not None and self.mask in self.inputs:
            raise ValueError(f"mask '{self.mask}' is also one of the inputs")
        if isinstance(self.pad, dict) and set(self.pad) != set(self.inputs):
            raise ValueError("pad: one value for each of the inputs, or one number for all")
        if self.length is not None and self.max_length is not None:
            raise ValueError("length (fixed) and max_length exclude each other")
        return self

    def pad_of(self, name: str) -> float:
        return self.pad[name] if isinstance(self.pad, dict) else self.pad


class PreprocessingConfig(_Strict):
    image: ImagePipeline | None = None
    tabular: TabularPipeline | None = None
    sequence: SequencePipeline | None = None

    @model_validator(mode="after")
    def _check_inputs(self) -> PreprocessingConfig:
        fed: list[str] = []
        if self.image is not None:
            fed.append(self.image.input)
        if self.tabular is not None:
            fed.append(self.tabular.input)
        if self.sequence is not None:
            fed += [*self.sequence.inputs, *([self.sequence.mask] if self.sequence.mask else [])]
        twice = sorted({name for name in fed if fed.count(name) > 1})
        if twice:
            raise ValueError(f"two pipelines feed the same input: {', '.join(twice)}")
        return self


class DriftConfig(_Strict):
    """Drift of live inputs against the version's ``reference.json`` (when it has one)."""

    enabled: bool = True
    window_rows: int = Field(1000, ge=1, le=100_000_000)
    """Rows per window; drift is measured over the last complete one."""
    min_rows: int = Field(100, ge=1)
    """Before the first window is complete, drift is reported once this many rows came."""

    @model_validator(mode="after")
    def _check_rows(self) -> DriftConfig:
        if self.min_rows > self.window_rows:
            raise ValueError(f"min_rows {self.min_rows} is above window_rows {self.window_rows}")
        return self


class ModelConfig(_Strict):
    """The ``config.yaml`` of one model folder."""

    backend: Literal["onnxruntime"] = "onnxruntime"
    version_policy: VersionPolicy = VersionPolicy()
    primary: int | None = Field(None, ge=1)
    """The version that answers requests naming none; loaded even when the policy leaves it
    out. Default: the highest loaded version. Rollback and promotion edit this line."""
    batching: BatchingConfig = BatchingConfig()
    instance_count: int = Field(1, ge=1, le=64)
    """Model instances, each with its own session and worker thread."""
    execution: Literal["auto", "event_loop", "threads"] = "auto"
    """What runs the batches. ``event_loop``: the server's event loop, inline, with no
    thread hand-off (fastest on CPU, where the loop and the model share the cores anyway).
    ``threads``: one worker thread per instance, beside the loop (lets a GPU model compute
    while the loop parses the next requests). ``auto``: ``event_loop`` for one instance on
    the CPU, ``threads`` otherwise."""
    onnxruntime: OnnxRuntimeConfig = OnnxRuntimeConfig()
    warmup: bool = True
    """Run generated inputs through each instance before the model is reported ready."""
    validation: Literal["reject", "warn", "off"] = "reject"
    """What a request whose values fail the version's ``schema.yaml`` gets: 400 (reject),
    an answer with the failure counted and logged (warn), or no check (off)."""
    task: Literal["auto", "classifier", "regressor"] = "auto"
    """How predictions are read for shadow comparison, review and accuracy: a classifier
    by its [rows, classes] probabilities, a regressor by its one float output."""
    preprocessing: PreprocessingConfig = PreprocessingConfig()
    drift: DriftConfig = DriftConfig()
    shadow: ShadowConfig | None = None
    review: ReviewConfig = ReviewConfig()
    promotion: PromotionGate = PromotionGate()
    description: str = ""

    @field_validator("validation", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare ``off`` as false: take it as meant."""
        return "off" if value is False else value

    @model_validator(mode="after")
    def _check_execution(self) -> ModelConfig:
        if self.execution == "event_loop" and self.instance_count != 1:
            raise ValueError(
                f"execution: event_loop runs one instance, but instance_count is "
                f"{self.instance_count} (use threads)"
            )
        if self.shadow is not None and self.primary == self.shadow.version:
            raise ValueError(f"version {self.primary} cannot be both primary and shadow")
        return self

    def serving_settings(self) -> dict[str, Any]:
        """The settings a loaded version is built from: when these are unchanged, an edit
        of the config reuses the loaded sessions."""
        return self.model_dump(
            exclude={"version_policy", "primary", "description", "shadow", "review", "promotion"}
        )


def _node_line(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the YAML node at ``loc`` (a pydantic error location), if found."""
    node = root
    line = None if node is None else node.start_mark.line + 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == key:
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
            if key >= len(node.value):
                return line
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def load_model_config(path: Path, display: str | None = None) -> ModelConfig:
    """Parse and validate a model's ``config.yaml``; raise ConfigError naming the file
    (as ``display`` when given), the line and the field."""
    where_file = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(where_file, f"cannot read: {exc.__class__.__name__}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(where_file, f"{where}invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(where_file, "line 1: the top level must be a mapping of settings")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            field = ".".join(str(p) for p in loc) or "(top level)"
            line = _node_line(root, loc)
            where = f"line {line}: " if line is not None else ""
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown setting (check the spelling)"
            problems.append(f"{where}{field}: {msg}")
        raise ConfigError(where_file, "; ".join(problems)) from None


class ServerConfig(_Strict):
    """Settings of one server process (from the command line)."""

    repository: Path
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Largest request body accepted, after decompression (413 above it)."""
    body_timeout_s: float = Field(30.0, gt=0)
    """A client that has not sent its whole body in this time gets 408."""
    drain_timeout_s: float = Field(30.0, ge=0)
    """On SIGTERM, time given to in-flight requests before the process exits."""
    idle_timeout_s: float = Field(15.0, gt=0)
    """A connection that has not sent a complete request head this long after connecting,
    or after its last response, is closed: idle keep-alive and slow headers alike."""
    watch: Literal["events", "poll", "off"] = "events"
    """How the repository is watched for edits: filesystem events (polling where the
    platform gives none), polling only, or not at all (changes then apply through the
    repository API's ``load``)."""
    watch_debounce_ms: int = Field(100, ge=10, le=60_000)
    """A burst of edits is applied once it has been quiet this long."""
    poll_interval_s: float = Field(0.5, gt=0, le=3600)
    """Scan period of the polling watcher."""
    retire_timeout_s: float = Field(30.0, ge=0)
    """After a swap, how long requests still running on a retired version may take before
    it is unloaded anyway."""
    admin_token: SecretStr | None = None
    """Bearer token the admin routes (repository API) require. Without one they are
    refused. Never logged."""
    state_db: Path | None = None
    """The SQLite file of predictions, shadow comparisons, feedback, review items and
    promotion records. None: ``REPO-state.db`` beside the repository folder REPO."""
    retention_days: float = Field(7.0, gt=0, le=3650)
    """Records older than this are deleted (promotion records are kept)."""
    busy_poll_us: int = Field(200, ge=0, le=10_000)
    """Once the last request in flight is answered, the event loop polls rather than sleeps
    for up to this long, so that a request that follows at once finds it running
    (``fastserve.http.busypoll``; the window adapts to the traffic and closes when requests
    trickle in). 0: sleep at once."""
    monitoring: bool = True
    """Time each request's stages and count live inputs for drift (False: neither; the
    counters Triton's statistics route reports are kept either way)."""
    alert_webhook: str | None = None
    """URL that alerts computed in the server (drift, error rate) are POSTed to, for users
    without Alertmanager. None: off."""
    alert_interval_s: float = Field(30.0, gt=0, le=3600)
    """How often those alerts are evaluated."""

    @property
    def state_path(self) -> Path:
        repo = self.repository.resolve()
        return self.state_db or repo.parent / f"{repo.name}-state.db"


_PRIMARY_LINE = re.compile(r"^primary:[^\n]*$", re.MULTILINE)
# A top-level ``shadow:`` mapping: its line and the indented (or blank) lines under it.
_SHADOW_BLOCK = re.compile(r"^shadow:[^\n]*\n(?:(?:[ \t]+[^\n]*|[ \t]*)(?:\n|$))*", re.MULTILINE)


def write_primary(path: Path, version: int, *, drop_shadow: bool = False) -> str:
    """Set ``primary: VERSION`` in the model config at ``path`` (and with ``drop_shadow``
    remove its ``shadow:`` section: a promoted shadow is the primary now); return the old
    text.

    Only those lines change (``primary`` is added when missing), so comments and layout
    survive. The new text is validated before it replaces the file, by write-then-rename,
    so a reader never sees half of it.
    """
    try:
        old = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read: {exc.__class__.__name__}") from None
    new = _SHADOW_BLOCK.sub("", old, count=1) if drop_shadow else old
    line = f"primary: {version}"
    new, found = _PRIMARY_LINE.subn(line, new, count=1)
    if not found:
        new = f"{new}{'' if not new or new.endswith(chr(10)) else chr(10)}{line}\n"
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staging.write_text(new, encoding="utf-8")
        written = load_model_config(staging, display=str(path))
        if written.primary != version or (drop_shadow and written.shadow is not None):
            raise ConfigError(str(path), f"cannot set 'primary: {version}' in this file")
    finally:
        staging.unlink(missing_ok=True)
    replace_file(path, new)
    return old


def replace_file(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` by write-then-rename (durable, never half-written)."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(staging, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
