"""HTTP routes of the live service: logged impressions (POST /events) and users' histories.

An impression is checked whole before anything of its body is stored: a 422 names the field
and the value at fault, as FastAPI's own validation errors do (`detail`: a list of
{"loc", "msg", "input"}).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Protocol

import msgspec
import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from mmnewsrec.csr import isin_small, segment_ids
from mmnewsrec.formats.store import SIGNAL_NAMES
from mmnewsrec.serve.live import CLICKED, SHOWN, LiveState, NewsRows, index_news
from mmnewsrec.serve.recommender import Recommender
from mmnewsrec.serve.state import Row, stored_rows

ID_PATTERN, MAX_ID = r"^\S+$", 64  # impression and user ids
EventId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID, pattern=ID_PATTERN)]
NewsRef = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID)]  # looked up
MAX_SHOWN = 1000  # news ids in one impression's shown list (MIND's longest: about 300)
MAX_EVENT_HISTORY = 1000
MAX_BATCH = 10_000  # impressions in one POST /events/batch
MAX_FUTURE = timedelta(days=1)  # how far ahead of the server's clock an impression may be


class EventIn(BaseModel):
    """One impression as MIND logs it: the news shown to a user and those they clicked."""

    model_config = ConfigDict(extra="forbid")
    impression_id: EventId
    user_id: EventId
    time: str | None = Field(
        None, description="ISO 8601; UTC when it has no offset; the server's clock if left out."
    )
    history: list[NewsRef] = Field(
        default_factory=list,
        max_length=MAX_EVENT_HISTORY,
        description="The user's clicks before the logs began (MIND's history column).",
    )
    shown: list[NewsRef] = Field(min_length=1, max_length=MAX_SHOWN)
    clicked: list[NewsRef] = Field(default_factory=list, max_length=MAX_SHOWN)

    # Times, repeated ids and news ids are checked by `to_batch`, in one pass over a batch:
    # as pydantic validators in Python they took most of a bulk load's time.


class Event(Protocol):
    """The fields of an impression, validated (an `EventIn` or an `EventFields`)."""

    impression_id: str
    user_id: str
    time: str | None
    history: list[str]
    shown: list[str]
    clicked: list[str]


MsgId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID, pattern=ID_PATTERN)]
MsgRef = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID)]


class EventFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`EventIn` for msgspec: a bulk body decoded and checked in one pass in C, as strictly as
    pydantic checks it (a body it refuses goes to pydantic, which names the faults)."""

    impression_id: MsgId
    user_id: MsgId
    time: str | None = None
    history: Annotated[list[MsgRef], msgspec.Meta(max_length=MAX_EVENT_HISTORY)] = []
    shown: Annotated[list[MsgRef], msgspec.Meta(min_length=1, max_length=MAX_SHOWN)]
    clicked: Annotated[list[MsgRef], msgspec.Meta(max_length=MAX_SHOWN)] = []


BATCH_DECODER = msgspec.json.Decoder(list[EventFields])


class EventStored(BaseModel):
    impression_id: str
    stored: bool = Field(description="False: this impression id was logged before (not again).")


class BatchStored(BaseModel):
    stored: int = Field(description="Impressions logged by this request.")
    duplicates: list[str] = Field(description="Impression ids logged before (not again).")


class SignalsIn(BaseModel):
    """Candidates shown to a user with a click history at a time."""

    model_config = ConfigDict(extra="forbid")
    time: str = Field(description="ISO 8601, not before the latest logged impression.")
    history: list[NewsRef] = Field(default_factory=list, max_length=MAX_EVENT_HISTORY)
    candidates: list[NewsRef] = Field(min_length=1, max_length=MAX_SHOWN)

    @field_validator("time")
    @classmethod
    def _iso_time(cls, value: str) -> str:
        parse_time(value)
        return value


class SignalsOut(BaseModel):
    names: list[str]
    values: list[list[float]] = Field(description="One row per candidate, one column per name.")


class UserOut(BaseModel):
    user_id: str
    known: bool = Field(description="The user is in the store's logs or the event log.")
    history: list[str] = Field(description="Clicked news ids, oldest first, each once.")
    titles: list[str] = Field(description="Their titles.")


def parse_time(value: str, now: datetime | None = None) -> int:
    """Unix seconds of an ISO 8601 time (UTC without an offset); ValueError if unparseable,
    before 1970 or over a day ahead of the server's clock (`now`, read if not given)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if moment.timestamp() < 0 or moment > (now or datetime.now(UTC)) + MAX_FUTURE:
        raise ValueError(f"{value!r} is before 1970 or more than a day ahead of the server")
    return int(moment.timestamp())


# ---------------------------------------------------------------------------- dependencies


async def get_live(request: Request) -> LiveState:
    live = request.app.state.live
    if live is None:
        raise HTTPException(501, "this server keeps no state: start it with --state")
    return live


async def get_recommender(request: Request) -> Recommender:
    return request.app.state.recommender


LiveDep = Annotated[LiveState, Depends(get_live)]
RecommenderDep = Annotated[Recommender, Depends(get_recommender)]


@dataclass
class EventBatch:
    """Validated impressions as columns: their stored rows, users, times (unix seconds) and
    news indices."""

    rows: list[Row]
    user_ids: list[str]
    times: np.ndarray
    news: NewsRows

    def impression_ids(self) -> list[str]:
        return [row[0] for row in self.rows]

    def take(self, keep: np.ndarray) -> EventBatch:
        """These impressions (indices), in this order."""
        picked = keep.tolist()
        rows, users = [self.rows[n] for n in picked], [self.user_ids[n] for n in picked]
        return EventBatch(rows, users, self.times[keep], self.news.take(keep))


def to_batch(events: Sequence[Event], lookup: dict[str, int], nested: bool) -> EventBatch:
    """The columns of validated events, or a 422 naming every unparseable time, unknown news
    id, repeated news id, clicked id not shown and impression id repeated in the body.
    nested: a batch (locations by position). The checks run over the whole batch at once; the
    events they find at fault are then described one by one."""
    now = datetime.now(UTC)
    times, faulty = event_times([e.time for e in events], now)
    lists = [part for e in events for part in (e.history, e.shown, e.clicked)]
    news = NewsRows.of_lists(lists, lookup)
    faulty.update(_faulty_lists(news).tolist())
    ids = [e.impression_id for e in events]
    repeats: set[int] = set()
    if len(set(ids)) < len(ids):
        first: dict[str, int] = {}
        repeats = {n for n, i in enumerate(ids) if first.setdefault(i, n) < n}
    faulty |= repeats
    if faulty:
        errors: list[dict[str, Any]] = []
        for n in sorted(faulty):
            loc = ["body", n] if nested else ["body"]
            errors += _event_errors(loc, events[n], lookup, repeated=n in repeats, now=now)
        raise HTTPException(422, errors[:100])
    users = [e.user_id for e in events]
    return EventBatch(stored_rows(ids, users, times.tolist(), lists), users, times, news)


CANONICAL_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}")


def event_times(values: Sequence[str | None], now: datetime) -> tuple[np.ndarray, set[int]]:
    """Unix seconds of events' times (`now` where None) and the positions of those that
    `parse_time` refuses. Times written as numpy writes them (2019-11-14T08:00:00) are parsed
    at once (numpy refuses a field out of range as Python does; its year 0 falls before 1970),
    others one by one."""
    clock = int(now.timestamp())
    seconds = np.full(len(values), clock, dtype=np.int64)
    canonical = [n for n, v in enumerate(values) if v is not None and CANONICAL_TIME.fullmatch(v)]
    try:
        parsed = np.array([values[n] for n in canonical], dtype=str).astype("datetime64[s]")
    except ValueError:  # one of them is no time (2019-02-30): each is parsed alone
        canonical, parsed = [], np.zeros(0, dtype="datetime64[s]")
    at = np.asarray(canonical, dtype=np.int64)
    seconds[at] = parsed.astype(np.int64)
    latest = now.timestamp() + MAX_FUTURE.total_seconds()
    faulty = set(at[(seconds[at] < 0) | (seconds[at] > latest)].tolist())
    alone = np.ones(len(values), dtype=bool)
    alone[at] = False
    for n in np.flatnonzero(alone).tolist():
        value = values[n]
        if value is not None:
            try:
                seconds[n] = parse_time(value, now)
            except ValueError:
                seconds[n] = 0
                faulty.add(n)
    return seconds, faulty


def _faulty_lists(news: NewsRows) -> np.ndarray:
    """Impressions with an unknown news id, a news id twice in one list or a clicked id not
    shown."""
    row = segment_ids(news.offsets).astype(np.int64)
    width = int(news.items.max(initial=0)) + 2
    keys = np.sort(row * width + news.items + 1)
    repeated = keys[1:][keys[1:] == keys[:-1]] // width
    shown, clicked = news.part(SHOWN), news.part(CLICKED)
    shown_keys = segment_ids(shown.offsets).astype(np.int64) * width + shown.items
    clicked_row = segment_ids(clicked.offsets).astype(np.int64)
    not_shown = ~isin_small(clicked_row * width + clicked.items, shown_keys)
    rows = np.r_[row[news.items < 0] // 3, repeated // 3, clicked_row[not_shown]]
    return np.unique(rows)


def _event_errors(
    loc: list[Any], event: Event, lookup: dict[str, int], repeated: bool, now: datetime
) -> list[dict[str, Any]]:
    """Every fault of one event: its time, its news ids, its impression id repeated."""
    errors: list[dict[str, Any]] = []
    if event.time is not None:
        try:
            parse_time(event.time, now)
        except ValueError as err:
            errors.append({"loc": [*loc, "time"], "msg": str(err), "input": event.time})
    for name in ("history", "shown", "clicked"):
        errors += _id_errors([*loc, name], getattr(event, name), lookup)
    shown = set(event.shown)
    errors += [
        _error([*loc, "clicked", j], "clicked but not shown", news_id)
        for j, news_id in enumerate(event.clicked)
        if news_id not in shown
    ]
    if repeated:
        errors.append(_error([*loc, "impression_id"], "repeated in this body", event.impression_id))
    return errors


def _id_errors(loc: list[Any], ids: list[str], lookup: dict[str, int]) -> list[dict[str, Any]]:
    """Errors of a list of news ids: unknown ones, and each one repeated."""
    errors, seen = [], set()
    for j, news_id in enumerate(ids):
        if news_id not in lookup:
            errors.append(_error([*loc, j], "unknown news id", news_id))
        elif news_id in seen:
            errors.append(_error([*loc, j], "repeated news id", news_id))
        seen.add(news_id)
    return errors


def _error(loc: list[Any], msg: str, value: str) -> dict[str, Any]:
    return {"loc": loc, "msg": f"{msg}: {value!r}", "input": value}


async def log_batch(live: LiveState, batch: EventBatch) -> list[bool]:
    """Store impressions durably (their commit awaited), then learn from the new ones; which
    were new."""
    seqs = np.array(await asyncio.wrap_future(live.state.add_rows(batch.rows)), dtype=np.int64)
    if live.follower is not None:  # replicas learn from the shared log, this one too
        await live.follower.wait_for_own_writes()
        return (seqs > 0).tolist()
    fresh = np.flatnonzero(seqs)
    learnt = batch if len(fresh) == len(seqs) else batch.take(fresh)
    live.learn(learnt.impression_ids(), learnt.user_ids, learnt.times, learnt.news, seqs[fresh])
    return (seqs > 0).tolist()


async def store_batch(
    events: Sequence[Event], live: LiveState, recommender: Recommender
) -> BatchStored:
    """Check, store and learn from a batch of events."""
    if not 1 <= len(events) <= MAX_BATCH:
        message = f"a batch holds 1 to {MAX_BATCH} impressions, not {len(events)}"
        raise HTTPException(422, [{"loc": ["body"], "msg": message, "input": len(events)}])
    batch = to_batch(events, recommender.news_lookup, nested=True)
    new = await log_batch(live, batch)
    ids = batch.impression_ids()
    duplicates = [i for i, is_new in zip(ids, new, strict=True) if not is_new]
    return BatchStored(stored=sum(new), duplicates=duplicates)


class BulkRoute(APIRoute):
    """A route whose JSON body msgspec decodes and checks against `EventFields` in one pass;
    any other body (another content type, one msgspec refuses) goes through FastAPI and
    pydantic as usual, which name its faults."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        validated = super().get_route_handler()

        async def handler(request: Request) -> Response:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind == "application/json":
                try:
                    events = BATCH_DECODER.decode(await request.body())
                except msgspec.MsgspecError:
                    pass
                else:
                    live = await get_live(request)
                    stored = await store_batch(events, live, request.app.state.recommender)
                    return JSONResponse(stored.model_dump())
            return await validated(request)  # the body read above is read again from memory

        return handler


# ---------------------------------------------------------------------------- routes

events_router = APIRouter(prefix="/events", tags=["events"])
users_router = APIRouter(prefix="/users", tags=["users"])
signals_router = APIRouter(tags=["signals"])


@events_router.post("", response_model=EventStored)
async def post_event(body: EventIn, live: LiveDep, recommender: RecommenderDep) -> EventStored:
    """Log one impression; answered once it is on disk. A retried impression id is not logged
    again (`stored`: false)."""
    batch = to_batch([body], recommender.news_lookup, nested=False)
    (new,) = await log_batch(live, batch)
    return EventStored(impression_id=body.impression_id, stored=new)


async def post_events(
    body: list[EventIn], live: LiveDep, recommender: RecommenderDep
) -> BatchStored:
    """Log up to 10,000 impressions in one transaction: all of them, or none on a 422."""
    return await store_batch(body, live, recommender)


events_router.add_api_route(
    "/batch",
    post_events,
    methods=["POST"],
    response_model=BatchStored,
    route_class_override=BulkRoute,
)


@signals_router.post("/signals", response_model=SignalsOut)
async def post_signals(body: SignalsIn, live: LiveDep, recommender: RecommenderDep) -> SignalsOut:
    """The behaviour signals the server holds for these candidates at this time (as `prepare`
    computes them for a logged impression): to inspect them, or check them against a store's."""
    lookup = recommender.news_lookup
    errors = [
        _error(["body", name, j], "unknown news id", news_id)
        for name in ("history", "candidates")
        for j, news_id in enumerate(getattr(body, name))
        if news_id not in lookup
    ]
    at = parse_time(body.time)
    if at < (live.signals.time or 0):
        errors.append(_error(["body", "time"], "before the latest logged impression", body.time))
    if errors:
        raise HTTPException(422, errors)
    table = live.signals.signals(
        0, at, index_news(lookup, body.history), index_news(lookup, body.candidates)
    )
    return SignalsOut(names=list(SIGNAL_NAMES), values=table.tolist())


@users_router.get("/{user_id}", response_model=UserOut)
async def get_user(user_id: str, live: LiveDep, recommender: RecommenderDep) -> UserOut:
    """A user's click history as the service knows it (store logs, then the event log)."""
    history = live.history(user_id)
    ids = recommender.news_ids_of(history)
    titles = [recommender.summary(int(i)).title for i in history]
    return UserOut(user_id=user_id, known=live.users.known(user_id), history=ids, titles=titles)
