"""The settings of an extraction, written once: what makes the numbers (``ExtractConfig``) and how a run goes
(``RunOptions``).

Each is one pydantic model, built once wherever a run starts (the CLI generates its options from the fields, a
deployment's ``prefect.yaml`` names them, the Prefect UI renders them as a form with each field's description)
and passed whole to the flow. The content key of stored features is derived from ``ExtractConfig`` in one place,
``ExtractConfig.key``.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mess_ai.audio.validation import AudioLimits
from mess_ai.audio.windows import WindowSpec
from mess_ai.features.checkpoint import DEFAULT_MODEL


class ExtractConfig(BaseModel):
    """How features are extracted: the model and its weights, the windows, the precision, and the limits on
    input files. Recorded with the outputs (provenance.json); its ``key`` says whether stored features are still
    the right ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="Hugging Face hub id or local directory of the model.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin; empty for the "
                                                   "default branch. The commit it resolves to is recorded.")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps. cuda (and "
                                            "auto with CUDA) runs the model on every GPU the process sees "
                                            "(CUDA_VISIBLE_DEVICES), one model copy each; cuda:N on that GPU only.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: the dataset's own precision once it has features, else bf16 autocast on CUDA "
                            "and fp32 elsewhere.")
    batch_size: int | None = Field(None, ge=1, description="Windows per forward pass; empty for the device's "
                                                           "default (cuda 32, mps 8, cpu 4).")
    keep_raw: bool = Field(False, description="Also store frame-level hidden states (float16, about 10 GB per "
                                              "audio hour).")
    window_seconds: float = Field(5.0, gt=0, description="Window length in seconds.")
    hop_seconds: float = Field(2.5, gt=0, description="Hop between window starts in seconds.")
    min_duration_seconds: float = Field(1.0, ge=0, description="Shorter files are recorded as failed.")
    min_sample_rate: int = Field(4000, gt=0, description="Files whose header gives a lower sampling rate fail "
                                                         "(for good) before decoding.")
    max_sample_rate: int = Field(384_000, gt=0, description="Files whose header gives a higher sampling rate fail "
                                                            "before decoding.")
    max_duration_hours: float = Field(6.0, gt=0, description="Longer files fail, from the header and while "
                                                             "decoding; bounds one file's memory (about 350 MB "
                                                             "per hour at 24 kHz).")
    trust_remote_code: bool = Field(False, description="Let a non-MERT hub model run its own code.")

    @model_validator(mode="before")
    @classmethod
    def _from_parts(cls, data: Any) -> Any:
        """``window=WindowSpec(...)`` and ``limits=AudioLimits(...)`` are accepted as well as their fields."""
        if isinstance(data, dict) and ("window" in data or "limits" in data):
            data = dict(data)
            window, limits = data.pop("window", None), data.pop("limits", None)
            if window is not None:
                data.update(window_seconds=window.window_seconds, hop_seconds=window.hop_seconds,
                            min_duration_seconds=window.min_duration_seconds)
            if limits is not None:
                data.update(min_sample_rate=limits.min_sample_rate, max_sample_rate=limits.max_sample_rate,
                            max_duration_hours=limits.max_duration_seconds / 3600)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "ExtractConfig":
        self.window  # noqa: B018 - WindowSpec and AudioLimits check how their fields go together
        self.limits  # noqa: B018
        return self

    @property
    def window(self) -> WindowSpec:
        return WindowSpec(self.window_seconds, self.hop_seconds, self.min_duration_seconds)

    @property
    def limits(self) -> AudioLimits:
        return AudioLimits(self.min_sample_rate, self.max_sample_rate, self.max_duration_hours * 3600)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def key(self, precision: str | None = None, fingerprint: str | None = None) -> str:
        """The content key of this config: same key, same features (batch size, raw and the input limits do not
        change them).

        What changes the numbers: the weights actually loaded (``fingerprint``: ``model_identity``'s, by default
        resolved now: a local folder by the hash of its files, a hub id by the commit its revision stands for),
        the windowing, and ``precision``, the precision actually used (``auto`` resolved, see
        ``resolve_precision``; default: this config's own on its device)."""
        from mess_ai.store.keys import config_key

        if precision is None:  # torch only when the device decides (a no-op `mess-ai extract` runs without it)
            from mess_ai.features.device import device_type
            from mess_ai.features.extractor import resolve_precision

            precision = resolve_precision(self.precision, device_type(self.device))
        if fingerprint is None:
            from mess_ai.features.identity import model_identity

            fingerprint = model_identity(self.model, self.revision)["fingerprint"]
        return config_key({"model": fingerprint, "window": self.window.to_dict(), "precision": precision})

    def describe(self, precision: str, identity: dict[str, Any] | None = None) -> dict[str, Any]:
        """What makes the numbers, in words a person can compare: recorded for each config a dataset has had."""
        from mess_ai.features.identity import model_identity

        identity = identity or model_identity(self.model, self.revision)
        return {"model": self.model, "revision": self.revision, "resolved_revision": identity["resolved_revision"],
                "model_fingerprint": identity["fingerprint"], "window_seconds": self.window_seconds,
                "hop_seconds": self.hop_seconds, "min_duration_seconds": self.min_duration_seconds,
                "precision": precision}


class RunOptions(BaseModel):
    """How an extraction run goes: the size of its chunks of work, its GPU concurrency slots, its retries and its
    time limits. None of it changes the features."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    files_per_task: int = Field(16, ge=1, description="At most this many files per extraction task (a chunk); the "
                                                      "files are spread evenly over the chunks, at least one "
                                                      "more of them than the run has devices (two for one) when "
                                                      "there are files enough.")
    minutes_per_task: float | None = Field(
        60.0, gt=0, description="Also cap a chunk at about this much audio (a longer file makes a chunk of its "
                                "own); empty for no cap. The decoded audio held at once is bounded apart, by the "
                                "audio in flight to the model: about 10 minutes per decode worker, and one file "
                                "per chunk.")
    decode_workers: int | None = Field(
        None, ge=0, description="Processes that decode audio ahead of the model. 0: decode in the run's own process "
                                "(a thread per chunk in flight). Empty: 4 per GPU, capped by the cores less one; 0 on "
                                "a CPU, where the model is hundreds of times slower than decoding.")
    gpu_limit: str = Field("gpu", description="Name of the Prefect global concurrency limit the run holds for its "
                                              "model work, one slot per GPU it uses; empty for none. '{host}' "
                                              "in it is replaced by this machine's host name (one limit per GPU "
                                              "host: 'gpu:{host}').")
    gpu_slots: int | None = Field(None, ge=1, description="Slots of that limit, used when the flow has to create it; "
                                                         "empty: as many as this host has GPUs (at least 1).")
    retries: int = Field(3, ge=0, description="Retries of a chunk whose files failed for transient reasons (I/O, "
                                              "GPU memory).")
    retry_delay_seconds: float = Field(10.0, ge=0, description="First retry delay; it doubles each retry, with "
                                                               "jitter.")
    time_limit_base_seconds: float = Field(
        600.0, gt=0, description="Every stage (listing, planning, validating, each chunk, the final check) may take "
                                 "this long, plus 1 s per file; a chunk also time_limit_per_audio_second per second "
                                 "of audio. A stage past its limit stops the run (Failed, with what it was stuck "
                                 "on); a file it was stuck on is recorded as failed.")
    time_limit_per_audio_second: float = Field(2.0, ge=0, description="A chunk's time limit per second of audio in "
                                                                      "it (headers' durations).")
    chunk_time_limit_seconds: float | None = Field(None, gt=0, description="A fixed time limit per chunk instead "
                                                                           "of the derived one; empty: derived.")
    run_time_limit_hours: float | None = Field(None, gt=0, description="The whole run's time limit; empty: its "
                                                                       "stages' limits added up.")


def sort_settings(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Flat settings sorted by name: (the ``ExtractConfig`` fields given, the ``RunOptions`` fields given, the rest:
    the flow's other parameters). Only what is given: the defaults stay the models' own."""
    config = {k: v for k, v in values.items() if k in ExtractConfig.model_fields}
    run = {k: v for k, v in values.items() if k in RunOptions.model_fields}
    rest = {k: v for k, v in values.items() if k not in config and k not in run}
    return config, run, rest


def split_settings(**values: Any) -> tuple[ExtractConfig, RunOptions, dict[str, Any]]:
    """Flat keyword settings sorted by name into an ``ExtractConfig``, a ``RunOptions`` and the rest (the flow's
    other parameters): ``split_settings(model=m, device="cpu", files_per_task=2, dataset="d")``. For scripts and
    tests that name a few settings; the names are the fields', so nothing is written twice."""
    config, run, rest = sort_settings(values)
    return ExtractConfig(**config), RunOptions(**run), rest
