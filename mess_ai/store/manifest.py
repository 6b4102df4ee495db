"""The manifest: one row per source file, recording what was extracted from which bytes, or why it failed.

SQLAlchemy Core over a SQLite file in the store by default; any SQLAlchemy URL (PostgreSQL) can replace it.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.engine import Connection, Engine, make_url

from mess_ai.errors import StoreError

F = TypeVar("F", bound=Callable[..., Any])

# Track ids per ``IN (...)`` query: below every database's limit on bound parameters (SQLite's was 999).
_KEYS_PER_QUERY = 500

DONE = "done"
FAILED = "failed"
PENDING = "pending"

metadata = MetaData()

tracks = Table(
    "tracks",
    metadata,
    Column("dataset", String(200), primary_key=True),
    Column("track_id", String(200), primary_key=True),
    Column("source_path", Text, nullable=False),
    Column("relative_path", Text, nullable=False),
    # 64-bit: nanosecond mtimes and files over 2 GiB overflow PostgreSQL's 32-bit INTEGER.
    Column("size", BigInteger),
    Column("mtime_ns", BigInteger),
    Column("sha256", String(64)),
    Column("config_key", String(64)),
    Column("status", String(16), nullable=False),
    Column("failure_stage", String(32)),
    Column("error_class", String(100)),
    Column("error_message", Text),
    # True when retrying the same bytes with the same config cannot help (undecodable, too short, ...).
    Column("permanent", Boolean),
    Column("attempts", Integer, nullable=False, default=0),
    Column("first_attempt_at", DateTime(timezone=True)),
    Column("last_attempt_at", DateTime(timezone=True)),
    Column("duration_seconds", Float),
    Column("n_windows", Integer),
    # Samples of the decoded signal at the model's rate: with the provenance's window rule, where each window lies
    # (``window_times``). 64-bit: six hours at a model rate of 100 kHz overflow a 32-bit INTEGER.
    Column("n_samples", BigInteger),
    Column("seconds_spent", Float),
    # The features on disk, whatever the row's status: their config key and window count. Kept when a later
    # attempt fails (good features are only ever replaced by new complete ones), so a failed or pending track can
    # still hold features of an earlier extraction, which the integrity check and the config-mix checks see.
    Column("features_config_key", String(64)),
    Column("features_n_windows", Integer),
    # Attempts on these bytes and this config that began and never ended, counting the one in progress: the
    # process died during each of them. A file that kills its process every time is given up on.
    Column("unfinished", Integer),
    # "<inode>:<ctime_ns>" of the file when it was hashed: with size and mtime, what lets a later run reuse the
    # hash without reading the file. A copy that keeps size and mtime (cp -p) still gets a new inode or ctime.
    Column("file_identity", String(64)),
    # ``mess_ai.audio.loading.DECODER_REVISION`` of the decoding the features were made from (None: before it
    # was recorded): a decoding bug fixed later names the tracks to extract again.
    Column("decoder_revision", Integer),
    # The failures listing, the analysis's loading and the artifacts read one status of a dataset; the config-mix
    # check counts a dataset's feature configs: each from an index, not from every row of the dataset.
    Index("ix_tracks_dataset_status", "dataset", "status"),
    Index("ix_tracks_dataset_features_config", "dataset", "features_config_key"),
)

# Columns added after the first release: added to an existing manifest when it is opened.
_ADDED_COLUMNS = ("features_config_key", "features_n_windows", "unfinished", "file_identity", "n_samples",
                  "decoder_revision")

# What each dataset is: the audio folder it holds recordings of, and the config its features are extracted with
# (``configs``: JSON, every config key the dataset has had -> what it means, to describe a mix in words).
datasets = Table(
    "datasets",
    metadata,
    Column("dataset", String(200), primary_key=True),
    Column("audio_dir", Text, nullable=False),
    Column("config_key", String(64), nullable=False),
    Column("configs", Text, nullable=False),
    Column("created_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True)),
)


# Who is extracting which track right now, across processes and machines sharing one manifest (PostgreSQL in a
# multi-worker setup). A claim expires, so one held by a worker that died is taken over after its TTL.
claims = Table(
    "claims",
    metadata,
    Column("dataset", String(200), primary_key=True),
    Column("track_id", String(200), primary_key=True),
    Column("owner", String(200), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)


class Done(NamedTuple):
    """A track whose attempt is done: what ``Manifest.mark_done`` records of it."""

    track_id: str
    duration_seconds: float
    n_windows: int
    seconds_spent: float
    n_samples: int | None = None
    decoder_revision: int | None = None


def _update_row(conn: Connection, dataset: str, track_id: str, **values: Any) -> None:
    """Set ``values`` on the track's row, in the caller's transaction; ``StoreError`` when it has none."""
    result = conn.execute(
        tracks.update().where(tracks.c.dataset == dataset, tracks.c.track_id == track_id).values(**values))
    if result.rowcount != 1:
        raise StoreError(f"manifest has no row for {dataset}/{track_id}")


def _delete_claim(conn: Connection, dataset: str, track_id: str, owner: str) -> None:
    """Delete ``owner``'s claim on the track (if it still has it), in the caller's transaction."""
    conn.execute(claims.delete().where(claims.c.dataset == dataset, claims.c.track_id == track_id,
                                       claims.c.owner == owner))


def unfinished_before(row: Mapping[str, Any] | None, sha256: str | None, config_key: str) -> int:
    """Attempts on ``sha256`` with ``config_key`` that began and never ended, before the one about to begin:
    the row is still pending from them (an attempt that ends, in any way, leaves it done or failed, or resets
    the count), or failed with the count kept (its decoding process died). Unknown bytes (None) never match."""
    if row is None or row["status"] not in (PENDING, FAILED) or sha256 is None:
        return 0
    if row["sha256"] != sha256 or row["config_key"] != config_key:
        return 0
    return row.get("unfinished") or 0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def sqlite_url(path: str) -> str:
    return f"sqlite:///{path}"


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # Several processes share one SQLite file: wait for locks instead of failing, and use WAL so
        # readers (``mess-ai check``, the UI) never block a writer.
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def _create_tables(engine: Engine, attempts: int = 5) -> None:
    """Create the tables that do not exist yet, and add the columns and indexes a manifest of an earlier version
    lacks. Several runs may open a new store at the same moment: each sees no table (or no column, no index), and
    all but one then fail on CREATE TABLE, ADD COLUMN or CREATE INDEX ("already exists"). Trying again sees them."""
    for attempt in range(1, attempts + 1):
        try:
            metadata.create_all(engine)
            _add_missing_columns(engine)
            _add_missing_indexes(engine)
            return
        except DBAPIError:
            if attempt == attempts:
                raise
            time.sleep(0.05 * attempt)


def _add_missing_columns(engine: Engine) -> None:
    """Bring a manifest written by an earlier mess-ai up to date: the new columns (all nullable), and for its done
    tracks the description of the features they hold."""
    present = {column["name"] for column in inspect(engine).get_columns("tracks")}
    missing = [name for name in _ADDED_COLUMNS if name not in present]
    if not missing:
        return
    with engine.begin() as conn:
        for name in missing:
            column = tracks.c[name]
            conn.execute(text(f"ALTER TABLE tracks ADD COLUMN {name} {column.type.compile(engine.dialect)}"))
        if "features_config_key" in missing:
            conn.execute(tracks.update().where(tracks.c.status == DONE).values(
                features_config_key=tracks.c.config_key, features_n_windows=tracks.c.n_windows))


def _add_missing_indexes(engine: Engine) -> None:
    """Create the indexes of ``tracks`` a manifest of an earlier version lacks (``create_all`` makes a table's
    indexes only with the table)."""
    present = {index["name"] for index in inspect(engine).get_indexes("tracks")}
    for index in tracks.indexes:
        if index.name not in present:
            index.create(engine)


def _columns(names: Sequence[str] | None) -> list[Column]:
    """The columns of ``tracks`` named (all when None), ``track_id`` first."""
    return [tracks.c[name] for name in dict.fromkeys(["track_id", *(names or tracks.c.keys())])]


def _by_track(result: Any) -> dict[str, dict[str, Any]]:
    """The rows of a result whose first column is ``track_id``, as dicts by track id. Fetched at once and zipped
    with the column names: a row mapping per row costs several times more, which a plan of 100,000 files feels."""
    names = list(result.keys())
    return {row[0]: dict(zip(names, row)) for row in result.all()}


def path_text(path: str) -> str:
    """A path as the manifest stores it: valid Unicode text. A file name that is not UTF-8 comes from the OS with
    surrogate escapes, which databases refuse: its odd bytes are written as ``\\xff``."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def shown_url(url: str) -> str:
    """The URL as logs may show it: without a password (nor a ``password=`` in its query string)."""
    try:
        return make_url(url).difference_update_query(["password"]).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: shown as given
        return url


MANIFEST_URL_ENV = "MESS_AI_MANIFEST_URL"


def resolve_manifest_url(parameter: str | None, secret: str | None = None,
                         environ: Mapping[str, str] | None = None) -> str | None:
    """The manifest URL a flow run uses: ``parameter`` (a flow parameter) when given, else ``secret`` (the value
    of a Prefect Secret block), else ``$MESS_AI_MANIFEST_URL`` of this process (the worker's environment), else
    None: the SQLite file in the store.

    Prefect stores flow parameters in its database and shows them in the UI, so a parameter that carries a
    password is refused: the password would be readable by everyone who can see the run."""
    if parameter and secret:
        raise ValueError("both manifest_url and manifest_secret are given: name the manifest by one of them")
    if parameter:
        url = make_url(parameter)
        if url.password or "password" in url.query:
            raise ValueError(
                f"manifest_url {shown_url(parameter)} carries a password, and flow parameters are stored by Prefect "
                f"and shown in its UI: put the URL in the worker's environment as {MANIFEST_URL_ENV} or in a "
                "Prefect Secret block named by manifest_secret, and leave manifest_url empty")
        return parameter
    if secret:
        return secret
    return (os.environ if environ is None else environ).get(MANIFEST_URL_ENV) or None


def _database_errors(action: str) -> Callable[[F], F]:
    """Turn a driver error (disk full, database gone, locked for too long) into a ``StoreError`` that names the
    manifest and says what could not be done, so the CLI and the flows report it in one line."""
    def decorate(method: F) -> F:
        @functools.wraps(method)
        def wrapper(self: "Manifest", *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except DBAPIError as exc:
                reason = str(exc.orig) if exc.orig is not None else str(exc).splitlines()[0]
                raise StoreError(f"cannot {action} the manifest at {shown_url(self.url)}: {reason}") from exc
        return wrapper  # type: ignore[return-value]
    return decorate


class Manifest:
    """Read and update the rows of one store's manifest. A database error surfaces as a ``StoreError``."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine = _make_engine(url)
            _create_tables(self.engine)
        except Exception as exc:  # noqa: BLE001 - any driver error means the same thing to the user
            raise StoreError(f"cannot open the manifest at {shown_url(url)}: {exc}") from exc

    def close(self) -> None:
        self.engine.dispose()

    @_database_errors("read")
    def get(self, dataset: str, track_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(tracks).where(tracks.c.dataset == dataset, tracks.c.track_id == track_id)
            ).mappings().first()
        return dict(row) if row else None

    @_database_errors("read")
    def rows(self, dataset: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        query = select(tracks).order_by(tracks.c.dataset, tracks.c.relative_path)
        if dataset is not None:
            query = query.where(tracks.c.dataset == dataset)
        if status is not None:
            query = query.where(tracks.c.status == status)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    @_database_errors("read")
    def rows_by_track(self, dataset: str, columns: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Every row of ``dataset``, by track id, with ``columns`` only when given (and ``track_id``): one query,
        for what reads a whole dataset once (a run's plan, ``mess-ai check``)."""
        with self.engine.connect() as conn:
            # In the order of the primary key, which the query walks anyway: the same order every time.
            return _by_track(conn.execute(select(*_columns(columns)).where(tracks.c.dataset == dataset)
                                          .order_by(tracks.c.track_id)))

    @_database_errors("read")
    def rows_of(self, dataset: str, track_ids: Iterable[str], columns: Sequence[str] | None = None
                ) -> dict[str, dict[str, Any]]:
        """The rows of ``track_ids`` (those that have one), by track id, with ``columns`` only when given (and
        ``track_id``): read by key, so the cost follows the tracks asked about, not the size of the dataset."""
        wanted = list(dict.fromkeys(track_ids))
        found: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), _KEYS_PER_QUERY):
                found.update(_by_track(conn.execute(select(*_columns(columns)).where(
                    tracks.c.dataset == dataset, tracks.c.track_id.in_(wanted[start:start + _KEYS_PER_QUERY])))))
        return found

    @_database_errors("write")
    def begin_attempt(self, dataset: str, track_id: str, *, source_path: str, relative_path: str,
                      size: int | None, mtime_ns: int | None, sha256: str | None, config_key: str,
                      file_identity: str | None = None) -> int:
        """Mark a file as being attempted; returns the attempt number for these bytes and this config.

        Attempts count from the last change of content or config: new bytes deserve fresh tries.
        """
        now = _now()
        with self.engine.begin() as conn:
            row = conn.execute(
                select(tracks).where(tracks.c.dataset == dataset, tracks.c.track_id == track_id)
            ).mappings().first()
            values = dict(source_path=path_text(source_path), relative_path=path_text(relative_path),
                          size=size, mtime_ns=mtime_ns, file_identity=file_identity,
                          sha256=sha256, config_key=config_key, status=PENDING, last_attempt_at=now)
            if row is None:
                attempts = 1
                conn.execute(tracks.insert().values(dataset=dataset, track_id=track_id, attempts=attempts,
                                                    first_attempt_at=now, unfinished=1, **values))
            else:
                same = row["sha256"] == sha256 and row["config_key"] == config_key and sha256 is not None
                attempts = (row["attempts"] or 0) + 1 if same else 1
                conn.execute(
                    tracks.update()
                    .where(tracks.c.dataset == dataset, tracks.c.track_id == track_id)
                    .values(attempts=attempts,
                            first_attempt_at=row["first_attempt_at"] if same and row["first_attempt_at"] else now,
                            unfinished=unfinished_before(row, sha256, config_key) + 1, **values)
                )
        return attempts

    def end_attempt(self, dataset: str, track_id: str) -> None:
        """An attempt given back without an outcome by a run that stopped in order (the row stays pending, so
        the next run redoes the file): not counted as one the process died in."""
        self._update(dataset, track_id, unfinished=0)

    def update_content(self, dataset: str, track_id: str, *, size: int, mtime_ns: int, sha256: str,
                       file_identity: str | None = None) -> None:
        """Describe new bytes of a file being attempted (it changed while it was read); attempts unchanged."""
        self._update(dataset, track_id, size=size, mtime_ns=mtime_ns, sha256=sha256, file_identity=file_identity)

    def mark_done(self, dataset: str, track_id: str, *, duration_seconds: float, n_windows: int,
                  seconds_spent: float, n_samples: int | None = None, decoder_revision: int | None = None) -> None:
        """``n_samples``: of the decoded signal the windows were cut from (None: not known, as in rows written
        before mess-ai recorded it; readers then derive it from ``duration_seconds``); ``decoder_revision``: the
        decoding's (``mess_ai.audio.loading.DECODER_REVISION``)."""
        self.mark_done_many(dataset, [Done(track_id, duration_seconds, n_windows, seconds_spent, n_samples,
                                           decoder_revision)])

    @_database_errors("write")
    def mark_done_many(self, dataset: str, done: Sequence[Done], release_claims: Sequence[tuple[str, str]] = ()
                       ) -> None:
        """Mark every track of ``done`` done (as ``mark_done``) and delete the claims ``release_claims`` names
        ((track id, owner)), all in one transaction: the tracks one model batch finishes are settled with one
        write, not two per track. Nothing is written when a track has no row (``StoreError``)."""
        with self.engine.begin() as conn:
            for track in done:
                _update_row(conn, dataset, track.track_id, status=DONE, failure_stage=None, error_class=None,
                            error_message=None, permanent=None, duration_seconds=track.duration_seconds,
                            n_windows=track.n_windows, n_samples=track.n_samples,
                            decoder_revision=track.decoder_revision, seconds_spent=track.seconds_spent,
                            features_config_key=tracks.c.config_key, features_n_windows=track.n_windows,
                            unfinished=0)
            for track_id, owner in release_claims:
                _delete_claim(conn, dataset, track_id, owner)

    def mark_failed(self, dataset: str, track_id: str, *, stage: str, error_class: str, message: str,
                    permanent: bool, seconds_spent: float, duration_seconds: float | None = None,
                    unfinished: int = 0) -> None:
        """``unfinished``: attempts on these bytes a process died in, this one included, kept when the process that
        died was the attempt's decoding process (the next attempt adds to them); else 0."""
        self._update(dataset, track_id, status=FAILED, failure_stage=stage, error_class=error_class,
                     error_message=path_text(message), permanent=permanent, seconds_spent=seconds_spent,
                     duration_seconds=duration_seconds, n_windows=None, n_samples=None, unfinished=unfinished)

    @_database_errors("write")
    def claim(self, dataset: str, track_id: str, owner: str, ttl_seconds: float, same_host_prefix: str | None = None
              ) -> bool:
        """Claim a track for ``owner``; False when another owner holds an unexpired claim.

        ``same_host_prefix``: owners starting with it (this host) are taken over at once. The caller holds the
        track's file lock, so no live process of this host is working on the track: such a claim is a leftover
        of a process that was killed."""
        now = _now()
        expires = now + dt.timedelta(seconds=ttl_seconds)
        try:
            with self.engine.begin() as conn:
                conn.execute(claims.insert().values(dataset=dataset, track_id=track_id, owner=owner,
                                                    expires_at=expires))
            return True
        except IntegrityError:
            pass
        # Taken over only when expired, ours, or left by a dead process of this host: one conditional UPDATE,
        # atomic in every database.
        takeover = [claims.c.expires_at < now, claims.c.owner == owner]
        if same_host_prefix:
            takeover.append(claims.c.owner.startswith(same_host_prefix, autoescape=True))
        with self.engine.begin() as conn:
            result = conn.execute(
                claims.update()
                .where(claims.c.dataset == dataset, claims.c.track_id == track_id, or_(*takeover))
                .values(owner=owner, expires_at=expires))
        return result.rowcount == 1

    @_database_errors("write")
    def release_claim(self, dataset: str, track_id: str, owner: str) -> None:
        with self.engine.begin() as conn:
            _delete_claim(conn, dataset, track_id, owner)

    @_database_errors("read")
    def claimed_by_other(self, dataset: str, track_id: str, owner: str, ignore_prefix: str | None = None) -> bool:
        """An unexpired claim by another owner (owners starting with ``ignore_prefix`` do not count)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(claims.c.owner, claims.c.expires_at).where(
                claims.c.dataset == dataset, claims.c.track_id == track_id)).first()
        if row is None or row.owner == owner or (ignore_prefix and row.owner.startswith(ignore_prefix)):
            return False
        expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=dt.timezone.utc)
        return expires > _now()

    # --- datasets ---------------------------------------------------------------------------------------------
    @_database_errors("read")
    def dataset_record(self, dataset: str) -> dict[str, Any] | None:
        """What the dataset is (its audio folder, its config key, ``configs``: key -> description), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(datasets).where(datasets.c.dataset == dataset)).mappings().first()
        if row is None:
            return None
        record = dict(row)
        record["configs"] = json.loads(record["configs"] or "{}")
        return record

    @_database_errors("write")
    def create_dataset_record(self, dataset: str, *, audio_dir: str, config_key: str,
                              configs: dict[str, Any]) -> bool:
        """Record a new dataset; False when one of that name exists already (created at the same moment)."""
        now = _now()
        try:
            with self.engine.begin() as conn:
                conn.execute(datasets.insert().values(dataset=dataset, audio_dir=path_text(audio_dir),
                                                      config_key=config_key, configs=json.dumps(configs),
                                                      created_at=now, updated_at=now))
        except IntegrityError:
            return False
        return True

    @_database_errors("write")
    def update_dataset_record(self, dataset: str, *, config_key: str, configs: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(datasets.update().where(datasets.c.dataset == dataset).values(
                config_key=config_key, configs=json.dumps(configs), updated_at=_now()))

    @_database_errors("read")
    def feature_configs(self, dataset: str) -> dict[str, int]:
        """How many tracks hold features of each config key (whatever their status): more than one key is a
        dataset whose re-extraction is under way or was stopped."""
        with self.engine.connect() as conn:
            result = conn.execute(
                select(tracks.c.features_config_key, func.count())
                .where(tracks.c.dataset == dataset, tracks.c.features_config_key.is_not(None))
                .group_by(tracks.c.features_config_key))
            return {key: count for key, count in result}

    @_database_errors("write")
    def forget(self, dataset: str, track_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(tracks.delete().where(tracks.c.dataset == dataset, tracks.c.track_id == track_id))

    @_database_errors("write")
    def _update(self, dataset: str, track_id: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            _update_row(conn, dataset, track_id, **values)
