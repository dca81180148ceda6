#!/usr/bin/env python3
"""A small client for the service: submit images and a text, poll with a progress line, print every answer.

    python demo.py                                   # the shipped sample photo, a sample question
    python demo.py photo.jpg "what is the man holding?"
    python demo.py left.jpg right.jpg "there are two dogs" --tasks nlvr2,retrieval_coco
    python demo.py photo.jpg "the red car" --tasks refcoco --draw boxes.png
    python demo.py photo.jpg "which one is the cup?" --tasks visual7w --boxes "[[10,10,80,90],[100,20,160,120]]"
    python demo.py --collection holiday --add ~/Pictures/holiday     # index a folder (or files) into a collection
    python demo.py --collection holiday --search "a dog catching a frisbee" --top-k 5

Options: --url (default $VILBERT_URL or http://127.0.0.1:5000), --tasks, --top-k, --timeout. Exits 1 when the
job fails or times out, 2 on bad arguments or when the service cannot be reached.

Standard library only, so any Python 3.10+ runs it, no virtual environment needed; only --draw needs Pillow.
With no image it sends samples/astronaut.jpg (public domain, see samples/README.md).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

DEFAULT_TEXT = "what is the person doing?"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".mpo"}
UPLOAD_CHUNK = 16  # images per add request (the service's MAX_COLLECTION_UPLOAD_IMAGES default)
SAMPLE_PHOTO = Path(__file__).resolve().parent / "samples" / "astronaut.jpg"


def sample_photo() -> tuple[str, bytes]:
    try:
        return f"{SAMPLE_PHOTO.parent.name}/{SAMPLE_PHOTO.name} (sample)", SAMPLE_PHOTO.read_bytes()
    except OSError as exc:
        raise SystemExit(f"demo: no image given and the sample photo cannot be read ({exc}); pass an image") from None


def multipart(fields: dict[str, str], files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for index, data in enumerate(files):
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image{index}"\r\n'
                   f"Content-Type: application/octet-stream\r\n\r\n".encode())
        body.write(data[1])
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def call(url: str, data: bytes | None = None, content_type: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - the user's URL
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {"error": {"code": "http_error", "message": str(exc)}}


def poll(job_url: str, timeout: float) -> tuple[str | None, dict]:
    """Poll a job until it ends, with a one-line progress display: (final state, job), or (None, {}) on failure."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        status, job = call(job_url)
        if status != 200:
            print(f"\ndemo: polling failed ({status}): {job.get('error', job)}", file=sys.stderr)
            return None, {}
        state = job["status"]
        line = state
        if state == "queued":
            line += f" ({job.get('queue_position')} ahead)" if job.get("queue_position") is not None else ""
        elif state == "started":
            line += f": {job.get('stage', '')} {job.get('stage_detail', '')}".rstrip()
        if line != last:
            print(f"\r  job {job['id'][:8]}: {line:<50}", end="", flush=True)
            last = line
        if state in ("finished", "failed"):
            print()
            return state, job
        if time.monotonic() > deadline:
            print(f"\ndemo: no result after {timeout:.0f} s", file=sys.stderr)
            return None, {}
        time.sleep(0.3)


def image_paths(paths: list[str]) -> list[Path]:
    """The files given, and the image files directly inside the folders given (sorted)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise SystemExit(f"demo: no such file or folder: {path}")
    return found


def collection(base: str, name: str, add: list[str] | None, search: str | None, top_k: int | None,
               timeout: float, first_stage: str | None = None) -> int:
    """--collection NAME with --add PATH... (index images) or --search TEXT (rank the collection's images)."""
    url = f"{base}/api/v1/collections/{urllib.parse.quote(name, safe='')}"
    try:
        if add:
            files = image_paths(add)
            if not files:
                print("demo: no image files to add", file=sys.stderr)
                return 2
            names = {}
            for start in range(0, len(files), UPLOAD_CHUNK):
                chunk = files[start:start + UPLOAD_CHUNK]
                print(f"adding {start + 1}-{start + len(chunk)} of {len(files)} to collection {name!r}")
                status, body = call(url + "/images", *multipart({}, [(p.name, p.read_bytes()) for p in chunk]))
                if status != 202:
                    print(f"demo: refused ({status}): {body.get('error', body)}", file=sys.stderr)
                    return 1
                names.update(zip(body["image_ids"], (p.name for p in chunk)))
                state, job = poll(base + body["url"], timeout)
                if state != "finished":
                    error = job.get("error", {})
                    print(f"indexing failed: {error.get('code')}: {error.get('message')}", file=sys.stderr)
                    return 1
            status, info = call(url)
            print(f"collection {name!r}: {info.get('images')} images, {info.get('bytes')} bytes stored")
            return 0
        fields = {"text": search}
        if top_k:
            fields["top_k"] = str(top_k)
        if first_stage:
            fields["first_stage"] = first_stage
        status, body = call(url + "/search", *multipart(fields, []))
        if status != 202:
            print(f"demo: refused ({status}): {body.get('error', body)}", file=sys.stderr)
            return 1
        state, job = poll(base + body["url"], timeout)
        if state != "finished":
            error = job.get("error", {})
            print(f"search failed: {error.get('code')}: {error.get('message')}", file=sys.stderr)
            return 1
        result = job["result"]
        stage = result.get("first_stage", {})
        how = (f" (first stage: {stage['matched']} images named a word of it, {stage['reranked']} re-ranked)"
               if stage.get("used") else "")
        print(f"{len(result['hits'])} best of {result['scored']} images scored{how} for {search!r}:")
        for hit in result["hits"]:
            where = (f"  {hit.get('label') or 'region'} at {hit['box']} ({hit['box_score']:.2f})"
                     if hit.get("box") else "")
            print(f"  {hit['rank']:>3}. {hit['image_id']}  score {hit['score']:+.4f}{where}")
        return 0
    except (urllib.error.URLError, OSError) as exc:
        print(f"demo: cannot reach the service at {base}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 2


def format_result(result: dict) -> str:
    lines = []
    model = result.get("model", {})
    if model.get("tiny"):
        lines += ["!" * 80, "TINY RANDOM-WEIGHT MODEL: these answers are meaningless (run `python models/fetch.py`).",
                  "!" * 80]
    images = ", ".join(f"{i['width']}x{i['height']} ({i['regions']} regions)" for i in result.get("images", []))
    lines.append(f"text:   {result.get('text', '')}")
    lines.append(f"images: {images}")
    for name, answer in result.get("tasks", {}).items():
        lines.append(f"\n{name}")
        if "answers" in answer:
            for item in answer["answers"]:
                lines.append(f"  {item['probability']:8.4f}  {item['answer']}")
        elif "regions" in answer:
            for item in answer["regions"]:
                lines.append(f"  {item['score']:8.4f}  box {item['box']}  {item.get('label') or ''}".rstrip())
        elif "candidates" in answer:
            for index, item in enumerate(answer["candidates"]):
                mark = "  <- best" if index == answer.get("best") else ""
                lines.append(f"  {item['score']:8.4f}  box {item['box']}  {item.get('label') or ''}".rstrip() + mark)
        elif "ranking" in answer:
            for rank, index in enumerate(answer["ranking"], 1):
                lines.append(f"  #{rank}  image {index}  score {answer['scores'][index]:.4f}  "
                             f"p {answer['probabilities'][index]:.4f}")
        elif "probabilities" in answer:
            for label, p in answer["probabilities"].items():
                mark = "  <-" if label == answer.get("label") else ""
                lines.append(f"  {p:8.4f}  {label}{mark}")
    timings = result.get("timings", {})
    if timings:
        lines.append("\ntimings: " + ", ".join(f"{k} {v:.3f}" for k, v in timings.items()))
    return "\n".join(lines)


def draw(image: bytes, result: dict, out: Path) -> None:
    from PIL import Image, ImageDraw  # only here: everything else runs on the standard library alone

    picture = Image.open(io.BytesIO(image)).convert("RGB")
    pen = ImageDraw.Draw(picture)
    colours = ["red", "lime", "cyan", "yellow", "magenta"]
    for n, (name, answer) in enumerate(result.get("tasks", {}).items()):
        boxes = [(r["box"], r["score"]) for r in answer.get("regions", []) + answer.get("candidates", [])]
        for box, score in boxes:
            pen.rectangle(box, outline=colours[n % len(colours)], width=3)
            pen.text((box[0] + 3, box[1] + 3), f"{name} {score:.2f}", fill=colours[n % len(colours)])
    picture.save(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="image paths, then the text (question, caption, statement)")
    parser.add_argument("--url", default=os.environ.get("VILBERT_URL", "http://127.0.0.1:5000"))
    parser.add_argument("--tasks", help="comma-separated task names (default: the service's default set)")
    parser.add_argument("--top-k", type=int, help="answers / regions per task")
    parser.add_argument("--boxes", help="candidate boxes for visual7w/guesswhat, JSON [[x1,y1,x2,y2], ...]")
    parser.add_argument("--text", help="the text (instead of the last positional argument)")
    parser.add_argument("--draw", type=Path, help="save the first image with the grounding boxes drawn on it")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the result")
    parser.add_argument("--collection", metavar="NAME", help="work on a collection: with --add or --search")
    parser.add_argument("--add", nargs="+", metavar="PATH", help="image files or folders to index into --collection")
    parser.add_argument("--search", metavar="TEXT", help="rank the images of --collection for this caption")
    parser.add_argument("--first-stage", choices=("auto", "on", "off"),
                        help="with --search: rank by region names first (on), never (off: every image scored), or "
                             "above the service's size threshold (auto, the default)")
    args = parser.parse_args(argv)
    if args.collection or args.add or args.search:
        if not args.collection or bool(args.add) == bool(args.search) or args.inputs:
            parser.error("use --collection NAME with exactly one of --add PATH... or --search TEXT")
        return collection(args.url.rstrip("/"), args.collection, args.add, args.search, args.top_k, args.timeout,
                          args.first_stage)
    if args.draw:
        try:
            import PIL  # noqa: F401 - checked before the job is submitted, not after it has run
        except ImportError:
            parser.error("--draw needs Pillow (pip install pillow); everything else runs without it")

    paths = [p for p in args.inputs if Path(p).is_file()]
    others = [p for p in args.inputs if not Path(p).is_file()]
    if len(others) > 1 or (others and args.text):
        parser.error(f"not image files: {', '.join(others)} (give one text, after the images)")
    text = args.text or (others[0] if others else DEFAULT_TEXT)
    images = [(p, Path(p).read_bytes()) for p in paths] or [sample_photo()]
    fields = {"text": text}
    for name in ("tasks", "boxes"):
        if getattr(args, name):
            fields[name] = getattr(args, name)
    if args.top_k:
        fields["top_k"] = str(args.top_k)

    base = args.url.rstrip("/")
    print(f"submitting {len(images)} image(s) [{', '.join(name for name, _ in images)}] with text {text!r} to {base}")
    try:
        status, body = call(base + "/api/v1/jobs", *multipart(fields, images))
    except (urllib.error.URLError, OSError) as exc:
        print(f"demo: cannot reach the service at {base}: {getattr(exc, 'reason', exc)} (is `make serve` running, "
              "or `python worker.py` and `python app.py`?)", file=sys.stderr)
        return 2
    if status != 202:
        print(f"demo: refused ({status}): {body.get('error', body)}", file=sys.stderr)
        return 1
    state, job = poll(base + body["url"], args.timeout)
    if state is None:
        return 1
    if state == "failed":
        error = job.get("error", {})
        print(f"job failed: {error.get('code')}: {error.get('message')}", file=sys.stderr)
        return 1
    print(format_result(job["result"]))
    if args.draw:
        draw(images[0][1], job["result"], args.draw)
        print(f"\nboxes drawn on {args.draw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
