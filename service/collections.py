"""Collections: a user's own images, indexed once (their detector regions stored) and searched by caption many
times (issue 14; so far the storage, a bulk indexing path and the search, without the HTTP API).

Storage is the job Redis, so every worker on every host sees the same collection and it survives restarts with the
append-only file. Per collection `<name>` (service.contract.COLLECTION_PREFIX + name):
- `:regions`, a hash image id -> the image's regions as a feature record (detector.records: float32 boxes and
  features, never pickle; about 0.8 MB an image at the full model's 100 x 2048);
- `:meta`, a hash image id -> JSON {"width", "height", "bytes" (the upload's length), "stored" (record bytes)};
- `:thumbs`, a hash image id -> a JPEG thumbnail, at most 256 px on its long side (none for an image indexed from
  a feature store without its image file: the thumbnail route answers 404 no_thumbnail for it);
- `:pending`, a hash image id -> the id of the add job that will index it (expires after UPLOAD_TTL), so the
  collection's info counts images not indexed yet;
- the lexical index of the images' region names (detector.categories; words, plural 's' dropped): `:terms`, a
  hash image id -> JSON {term: count} (that image's document: each region's name contributes its words);
  `:post:<term>`, a hash image id -> count (the inverted index); `:vocab`, the set of terms; `:length`, a hash
  image id -> the document's length in terms. A search ranks by BM25 over these before ViLBERT re-ranks the best
  (service.worker.collections.search, above a configurable collection size).
The set COLLECTION_NAMES_KEY holds every collection's name (MAX_COLLECTIONS counts it).
An add is admitted by one Lua script (ADMIT: the limits checked and the pending entries written atomically), so
concurrent adds, from any number of web processes, can never take a collection past its limits.
An image id is derived from the image's bytes (sha256), so adding the same bytes again is a no-op.
This module imports no torch: the web tier will use it too.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from redis import Redis

from detector.categories import name_terms
from detector.records import FeatureStoreError, decode_record, encode_record
from detector.regions import RegionFeatures

from .contract import COLLECTION_NAMES_KEY, COLLECTION_PREFIX
from .errors import BadRequest, NotFound
from .lexical import bm25_ranking

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
IMAGE_ID = re.compile(r"[0-9a-f]{32}")


def check_name(name: str) -> str:
    """A collection name: 1-63 lower-case letters, digits, '-' or '_', starting with a letter or digit. Names are
    only ever used inside Redis key names, never as paths."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadRequest("invalid_collection", "a collection name is 1 to 63 characters: lower-case letters, digits, "
                                               "'-' and '_', starting with a letter or digit")
    return name


def image_id_of(data: bytes) -> str:
    """The content-derived id of an image: the first 32 hex digits of the sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()[:32]


# Admit an add to a collection, atomically: the limits are checked and, only if they all allow it, the collection
# is counted (names set) and the add's new images (neither stored nor pending) are marked pending for its job.
# Checking and writing in one script is what keeps concurrent adds within the limits: with separate reads and
# writes, every add of a burst could read the same counts and all be admitted.
# KEYS: names set, regions, pending, meta. ARGV: name, max collections, max bytes, max images, job id, pending
# ttl, then the add's image ids. Returns {"ok", images after, new ids...} or {refusal code, the count refused}.
# Cost: one pass over the collection's metadata (bytes) and pending entries, O(images) inside Redis.
ADMIT = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then
  local count = redis.call('SCARD', KEYS[1])
  if count >= tonumber(ARGV[2]) then return {'too_many_collections', count} end
end
local stored = 0
for _, meta in ipairs(redis.call('HVALS', KEYS[4])) do stored = stored + tonumber(cjson.decode(meta)['stored']) end
if stored >= tonumber(ARGV[3]) then return {'collection_too_large', stored} end
local images = redis.call('HLEN', KEYS[2])
for _, id in ipairs(redis.call('HKEYS', KEYS[3])) do
  if redis.call('HEXISTS', KEYS[2], id) == 0 then images = images + 1 end
end
local new, seen = {}, {}
for i = 7, #ARGV do
  local id = ARGV[i]
  if not seen[id] and redis.call('HEXISTS', KEYS[2], id) == 0 and redis.call('HEXISTS', KEYS[3], id) == 0 then
    new[#new + 1] = id
  end
  seen[id] = true
end
images = images + #new
if images > tonumber(ARGV[4]) then return {'collection_full', images} end
redis.call('SADD', KEYS[1], ARGV[1])
for _, id in ipairs(new) do redis.call('HSET', KEYS[3], id, ARGV[5]) end
if #new > 0 then redis.call('EXPIRE', KEYS[3], ARGV[6]) end
local out = {'ok', images}
for _, id in ipairs(new) do out[#out + 1] = id end
return out
"""


@dataclass(frozen=True)
class Admission:
    """What ADMIT decided: `refused` is None (admitted) or the refusal's code; `count` is the collection's images
    after the add when admitted, else the count that refused it (collections, stored bytes or images)."""

    refused: str | None
    count: int
    new: list[str]  # the admitted add's images that were neither stored nor pending (now pending for its job)


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    images: int
    bytes: int  # stored: region records and thumbnails


class CollectionStore:
    """One collection in Redis (see the module docstring for the layout)."""

    def __init__(self, connection: Redis, name: str):
        self.connection = connection
        self.name = check_name(name)
        base = COLLECTION_PREFIX + self.name
        self.regions_key, self.meta_key, self.thumbs_key = base + ":regions", base + ":meta", base + ":thumbs"
        self.pending_key = base + ":pending"
        self.terms_key, self.vocab_key, self.length_key = base + ":terms", base + ":vocab", base + ":length"
        self.postings_prefix = base + ":post:"

    def image_count(self) -> int:
        """How many images are stored (indexed); pending ones are not counted."""
        return int(self.connection.hlen(self.regions_key))

    def has(self, image_id: str) -> bool:
        return bool(self.connection.hexists(self.regions_key, image_id))

    def add(self, image_id: str, regions: RegionFeatures, thumbnail: bytes | None, upload_bytes: int,
            labels: Sequence[str | None] | None = None, source: str | None = None) -> bool:
        """Store one image's regions and thumbnail (None: no thumbnail, e.g. indexed from a feature store without
        the image), and index its regions' names (`labels`, one per region; None without a category file); False
        (and nothing written) when the id is already there. `source`: where the regions came from (a feature
        store's image id), kept in the metadata so an operator can tell images apart."""
        record = encode_record(image_id, regions)
        terms = Counter(term for label in labels or () if label for term in name_terms(label))
        meta = {"width": int(regions.image_width), "height": int(regions.image_height), "bytes": int(upload_bytes),
                "stored": len(record) + len(thumbnail or b"")}
        if source is not None:
            meta["source"] = source
        if not self.connection.hsetnx(self.regions_key, image_id, record):
            return False
        with self.connection.pipeline() as pipe:
            pipe.hset(self.meta_key, image_id, json.dumps(meta))
            if thumbnail is not None:
                pipe.hset(self.thumbs_key, image_id, thumbnail)
            pipe.hset(self.terms_key, image_id, json.dumps(terms, sort_keys=True))
            pipe.hset(self.length_key, image_id, sum(terms.values()))
            for term, count in terms.items():
                pipe.hset(self.postings_prefix + term, image_id, count)
            if terms:
                pipe.sadd(self.vocab_key, *terms)
            pipe.execute()
        return True

    def ids(self) -> list[str]:
        """Every image id, sorted (a stable order for scoring and ties)."""
        return sorted(key.decode() for key in self.connection.hkeys(self.regions_key))

    def regions(self, image_ids: Sequence[str]) -> list[RegionFeatures]:
        """The stored regions of the given images, in order; an id that is not there is a NotFound."""
        records = self.connection.hmget(self.regions_key, list(image_ids)) if image_ids else []
        out = []
        for image_id, record in zip(image_ids, records):
            if record is None:
                raise NotFound("unknown_image", f"no image {image_id} in collection {self.name}")
            try:
                out.append(decode_record(record)[1])
            except FeatureStoreError as exc:
                raise FeatureStoreError(f"collection {self.name}, image {image_id}: {exc}") from exc
        return out

    def thumbnail(self, image_id: str) -> bytes:
        """The image's JPEG thumbnail; NotFound unknown_image, or no_thumbnail for an image indexed without one."""
        well_formed = IMAGE_ID.fullmatch(image_id) is not None  # nothing else ever reaches a key name
        data = self.connection.hget(self.thumbs_key, image_id) if well_formed else None
        if data is None:
            if well_formed and self.has(image_id):
                raise NotFound("no_thumbnail", f"image {image_id} of collection {self.name} has no thumbnail: it was "
                                               "indexed from a feature store without its image file")
            raise NotFound("unknown_image", f"no image {image_id!r} in collection {self.name}")
        return data

    def remove(self, image_id: str) -> bool:
        terms = json.loads(self.connection.hget(self.terms_key, image_id) or "{}")
        with self.connection.pipeline() as pipe:
            pipe.hdel(self.regions_key, image_id)
            pipe.hdel(self.meta_key, image_id)
            pipe.hdel(self.thumbs_key, image_id)
            pipe.hdel(self.terms_key, image_id)
            pipe.hdel(self.length_key, image_id)
            for term in terms:  # a term whose last image goes stays in :vocab, harmlessly, until the drop
                pipe.hdel(self.postings_prefix + term, image_id)
            removed = pipe.execute()[0]
        return bool(removed)

    def drop(self) -> int:
        """Delete the whole collection (pending entries, its index and its name too); returns how many images it
        held."""
        count = self.image_count()
        postings = [self.postings_prefix + term.decode() for term in self.connection.smembers(self.vocab_key)]
        with self.connection.pipeline() as pipe:
            pipe.delete(self.regions_key, self.meta_key, self.thumbs_key, self.pending_key, self.terms_key,
                        self.length_key, self.vocab_key)
            for start in range(0, len(postings), 512):
                pipe.delete(*postings[start:start + 512])
            pipe.srem(COLLECTION_NAMES_KEY, self.name)
            pipe.execute()
        return count

    # ---------------------------------------------------------------------------------- the lexical stage

    def lexical_ranking(self, text: str) -> list[tuple[str, float]]:
        """(image id, BM25 score) of every image whose region names share a word with `text`, best first (ties
        by id). Reads only the postings of the text's words and the lengths of the images they name."""
        query = sorted(set(name_terms(text)))
        if not query:
            return []
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hlen(self.regions_key)
            for term in query:
                pipe.hgetall(self.postings_prefix + term)
            replies = pipe.execute()
        images = int(replies[0])
        postings = [{k.decode(): int(v) for k, v in p.items()} for p in replies[1:] if p]
        if not images or not postings:
            return []
        named = sorted({image_id for posting in postings for image_id in posting})
        lengths = dict(zip(named, (int(n or 0) for n in self.connection.hmget(self.length_key, named))))
        total = sum(int(n) for n in self.connection.hvals(self.length_key))
        return bm25_ranking(postings, lengths, images, total)

    # ---------------------------------------------------------------------------- names and pending images

    def register(self) -> None:
        """Count this collection among the collections (MAX_COLLECTIONS)."""
        self.connection.sadd(COLLECTION_NAMES_KEY, self.name)

    def registered(self) -> bool:
        return bool(self.connection.sismember(COLLECTION_NAMES_KEY, self.name))

    def forget_if_empty(self) -> bool:
        """Stop counting a collection with no image and nothing pending (a failed first add, its last image
        deleted); True when forgotten."""
        if self.image_count() or self.connection.hlen(self.pending_key):
            return False
        self.connection.srem(COLLECTION_NAMES_KEY, self.name)
        return True

    def pending(self) -> dict[str, str]:
        """image id -> the add job that will index it (images uploaded, not indexed yet)."""
        return {k.decode(): v.decode() for k, v in self.connection.hgetall(self.pending_key).items()}

    def admit(self, image_ids: Sequence[str], job_id: str, ttl: int, max_collections: int, max_bytes: int,
              max_images: int) -> Admission:
        """Check an add against the limits and, if admitted, count the collection and mark its new images pending
        for `job_id` (expiring after `ttl` s), all in one atomic step (ADMIT). Refusal codes: too_many_collections
        (a new collection while there are `max_collections`), collection_too_large (it already stores `max_bytes`
        or more), collection_full (stored, pending and new images would pass `max_images`)."""
        keys = (COLLECTION_NAMES_KEY, self.regions_key, self.pending_key, self.meta_key)
        reply = self.connection.eval(ADMIT, len(keys), *keys, self.name, max_collections, max_bytes, max_images,
                                     job_id, ttl, *image_ids)
        code = reply[0].decode()
        return Admission(None if code == "ok" else code, int(reply[1]), [i.decode() for i in reply[2:]])

    def add_pending(self, image_ids: Sequence[str], job_id: str, ttl: int) -> None:
        if not image_ids:
            return
        with self.connection.pipeline() as pipe:
            pipe.hset(self.pending_key, mapping={image_id: job_id for image_id in image_ids})
            pipe.expire(self.pending_key, ttl)
            pipe.execute()

    def clear_pending(self, job_id: str, image_ids: Sequence[str] | None = None) -> None:
        """Remove the pending entries of one job (all of them, or only `image_ids`); another job's stay."""
        entries = self.pending()
        mine = [i for i, owner in entries.items() if owner == job_id and (image_ids is None or i in image_ids)]
        if mine:
            self.connection.hdel(self.pending_key, *mine)

    def info(self) -> CollectionInfo:
        metas = self.connection.hvals(self.meta_key)
        return CollectionInfo(self.name, self.image_count(),
                              sum(int(json.loads(m)["stored"]) for m in metas))


def collection_count(connection: Redis) -> int:
    """How many collections there are (COLLECTION_NAMES_KEY)."""
    return int(connection.scard(COLLECTION_NAMES_KEY))
