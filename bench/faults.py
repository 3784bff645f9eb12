"""Fault suite (run by hand, bounded): random SIGKILLs per stage, rerun, compare with a clean run; and races of two
writers into one output.

    python bench/faults.py [--trials 10] [--stages prep,embed,index-build,index-rebuild,train] [--seed 0]
    python bench/faults.py --trials 10 --stages embed-race,index-race

For every stage a clean run is timed first. Each trial then starts the stage in a subprocess, kills it with
SIGKILL after a random delay in [0, clean time), inspects what is published, reruns the same command (``--resume``
for train) to completion and compares the result with the clean run:

- prep:          ImageFolder -> dataset in a fresh prefix; identical = same manifest and shard bytes
- embed:         into a prefix that already holds a published embeddings set made with other settings (the issue's
                 failure 1); identical = same vectors / ids as a clean embed
- index-build:   Flat index into a fresh prefix; identical = same index.json, idmap and faiss bytes
- index-rebuild: HNSW32 over an existing Flat index in the same prefix; identical = same as a clean HNSW build
- train:         3 epochs with ``--resume`` after the kill (kills land during epochs and during checkpoint copies
                 into _staging/ last/ best/); identical = same last/ and best/ weights and metrics as a clean run
- train-ckpt:    as train, but the kill is aimed at a checkpoint write: the output is polled every millisecond and
                 the process is killed inside the n-th window (n random) in which _staging/, last/ or best/ holds
                 files but no sidecar (random delays rarely land in these few-millisecond windows)

Columns: trials; recovered = the rerun exited 0 and its output reads back; identical = and equals the clean run;
lost = trials in which, right after the kill, a *published* output did not read back whole (a reader would have
seen a torn or mixed output). Data is tiny and every process runs with OMP_NUM_THREADS=1 (shared CPU).

Races (issue 19): each trial starts writer A, then writer B after a random delay in [0, 1) s ("at once"), both
into one fresh output, and reads the published output back when the first of them exits and when the second does:

- embed-race:  two `lgff embed --out SAME` (240 images) with other settings (image size 32 / 48): two models
- index-race:  two `lgff index add --to IVF --embeddings E_A|E_B --out OUTZ` (on-disk IVF8,Flat over 2,000
               vectors, each appending 200,000 other 32-d vectors)

Each race runs twice: ``lease_wait_s=0`` (the second writer must fail with one line naming the holder, exit 2) and
``lease_wait_s=120`` (the second waits for the lease, then writes: both exit 0, the later one's output is published).
Columns: trials; ok = writers that exited 0; refused = exit 2 with one "another writer" line; other = any other
exit or a traceback; unreadable = published states (after the first exit, after the second) that did not read back
whole; last = trials whose final output is the writer that finished last (with waiting) or the one that held the
lease (without).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("prep", "embed", "index-build", "index-rebuild", "train", "train-ckpt")
RACES = ("embed-race", "index-race")
LEASE_WAITS = (0.0, 120.0)
EMBED_SET = ["--set", "embed.image_size=32", "--set", "embed.batch_size=8", "--set", "embed.bf16=false",
             "--set", "embed.channels_last=false"]
TRAIN_CONFIG = """base: lgffem_cpu
name: faults-tiny
seed: 0
model:
  channels: 16
  num_layers: 1
train:
  epochs: 3
  batch_size: 8
  image_size: 32
  augment:
    enabled: false
embed:
  bf16: false
  channels_last: false
"""


def lgff(*args: str) -> list[str]:
    return [sys.executable, "-m", "lgff_core", "-q", *args]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def run_and_kill(cmd: list[str], delay: float) -> None:
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def run_and_kill_when(cmd: list[str], condition, nth: int, timeout: float = 600) -> bool:
    """Kill the process inside the `nth` window in which `condition()` holds; True if it was killed there."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, inside, t0 = 0, False, time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        now = condition()
        if now and not inside:
            seen += 1
            if seen >= nth:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
        inside = now
        time.sleep(0.001)
    proc.wait()
    return False


def digest_files(root: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        p = root / name
        h.update(name.encode())
        h.update(p.read_bytes() if p.exists() else b"<missing>")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ stages


def make_tree(root: Path, n: int = 48) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        tint = np.array([60 + 60 * (i % 3), 90, 120], dtype=np.float64)
        img = np.clip(tint + rng.normal(0, 30, size=(32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i:04d}.png")


class Stage:
    name = ""

    def __init__(self, work: Path):
        self.work = work

    def prepare(self, out: Path) -> None:  # state the output starts from in every trial
        if out.exists():
            shutil.rmtree(out)

    def command(self, out: Path, resume: bool = False) -> list[str]:
        raise NotImplementedError

    def published_ok(self, out: Path) -> bool | None:
        """None = nothing published; True = what is published reads back whole; False = torn / mixed."""
        raise NotImplementedError

    def fingerprint(self, out: Path) -> str:
        raise NotImplementedError

    def mid_write(self, out: Path) -> bool:
        """True when the kill hit a publication step (only tracked where it is a distinct window)."""
        return False

    def kill(self, out: Path, clean_s: float, rng: random.Random) -> str:
        delay = rng.uniform(0.0, clean_s)
        run_and_kill(self.command(out), delay)
        return f"{delay:.1f} s"


class Prep(Stage):
    name = "prep"

    def command(self, out, resume=False):
        return lgff("prep", "imagefolder", "--src", str(self.work / "tree"), "--out", str(out), "--no-progress",
                    "--shard-mb", "0.03", "--split-fractions", "train=0.75,val=0.25")

    def published_ok(self, out):
        if not (out / "_manifest.json").exists():
            return None
        from lgff_core.data.shards import verify_dataset

        try:
            return not verify_dataset(str(out))
        except Exception:  # noqa: BLE001 - any failure to read back counts as torn
            return False

    def fingerprint(self, out):
        manifest = json.loads((out / "_manifest.json").read_text())
        return digest_files(out, ["_manifest.json"] + [s["name"] for s in manifest["shards"]])


class Embed(Stage):
    name = "embed"

    def prepare(self, out):
        super().prepare(out)
        shutil.copytree(self.work / "emb-other", out)  # published with other settings (image size 48)

    def command(self, out, resume=False):
        return lgff("embed", "--baseline", "--data", str(self.work / "data"), "--out", str(out), *EMBED_SET)

    def published_ok(self, out):
        if not (out / "_manifest.json").exists():
            return None
        from lgff_core.data.embeddings import read_embeddings

        try:
            read_embeddings(str(out))
            return True
        except Exception:  # noqa: BLE001
            return False

    def fingerprint(self, out):
        from lgff_core.data.embeddings import read_embeddings

        e = read_embeddings(str(out))
        return hashlib.sha256(e.xb.tobytes() + "\n".join(e.ids.tolist()).encode()).hexdigest()


class IndexBuild(Stage):
    name = "index-build"
    factory = "Flat"

    def command(self, out, resume=False):
        return lgff("index", "build", "--embeddings", str(self.work / "emb"), "--out", str(out),
                    "--factory", self.factory)

    def published_ok(self, out):
        if not (out / "index.json").exists():
            return None
        from lgff_core.index import load_index

        try:
            bundle = load_index(str(out))
            meta = bundle.meta
            kind = type(__import__("faiss").downcast_index(bundle.index)).__name__
            # the file must be the index the metadata describes (a Flat index.json over an HNSW file is torn)
            return (("HNSW" in str(meta.get("factory"))) == ("HNSW" in kind)
                    and int(meta.get("ntotal", -1)) == bundle.index.ntotal)
        except Exception:  # noqa: BLE001
            return False

    def fingerprint(self, out):
        return digest_files(out, ["index.json", "idmap.parquet", "index.faiss"])


class IndexRebuild(IndexBuild):
    name = "index-rebuild"
    factory = "HNSW32"

    def prepare(self, out):
        Stage.prepare(self, out)
        shutil.copytree(self.work / "idx-flat", out)


class Train(Stage):
    name = "train"

    def command(self, out, resume=False):
        return lgff("train", "--config", str(self.work / "tiny.yaml"), "--data", str(self.work / "data"),
                    "--out", str(out), "--no-memory-check", *(["--resume"] if resume else []))

    def published_ok(self, out):
        from lgff_core.train.checkpoint import is_complete, read_sidecar

        present = [p for p in ("last", "best") if (out / p / "model.json").exists()]
        if not present:
            return None
        return all(is_complete(str(out / p)) for p in present) and all(
            read_sidecar(str(out / p))["files"] for p in present)

    def mid_write(self, out):
        # a checkpoint directory with tensors but no sidecar: killed while writing _staging/ or copying last/ best/
        return any((out / p).is_dir() and any((out / p).iterdir()) and not (out / p / "model.json").exists()
                   for p in ("_staging", "last", "best"))

    def fingerprint(self, out):
        from lgff_core.train.checkpoint import read_sidecar

        parts = []
        for p in ("last", "best"):
            meta = read_sidecar(str(out / p))
            parts.append(f"{p}:{meta['epoch']}:{meta['files']['model.safetensors']['sha256']}")
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        parts += [f"{r['epoch']}:{r['train_loss']!r}:{r['val_recall@1']!r}" for r in rows]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class TrainCheckpoint(Train):
    name = "train-ckpt"
    # 3 epochs x (_staging/, last/, sometimes best/) windows
    windows = 6

    def kill(self, out, clean_s, rng):
        nth = rng.randint(1, self.windows)
        hit = run_and_kill_when(self.command(out), lambda: self.mid_write(out), nth)
        return f"checkpoint window {nth}" + ("" if hit else " (run ended first)")


# ------------------------------------------------------------------------------------------------ races


class Race:
    """Two writers of the same output, started a random delay apart."""

    name = ""

    def __init__(self, work: Path):
        self.work = work

    def commands(self, out: Path, wait_s: float) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def published_ok(self, out: Path) -> bool | None:
        raise NotImplementedError

    def writer_of(self, out: Path) -> str | None:
        """"A" or "B": whose output is published (None when nothing is)."""
        raise NotImplementedError


class EmbedRace(Race):
    name = "embed-race"

    def commands(self, out, wait_s):
        lease = ["--set", f"storage.lease_wait_s={wait_s}"]
        data = str(self.work / "race-data")
        a = lgff("embed", "--baseline", "--data", data, "--out", str(out), *EMBED_SET, *lease)
        other = [arg.replace("image_size=32", "image_size=48") for arg in EMBED_SET]
        b = lgff("embed", "--baseline", "--data", data, "--out", str(out), *other, *lease)
        return a, b

    def published_ok(self, out):
        return Embed.published_ok(self, out)

    def writer_of(self, out):
        if not (out / "_manifest.json").exists():
            return None
        fingerprint = json.loads((out / "_manifest.json").read_text()).get("model_fingerprint")
        return {self.fingerprints["A"]: "A", self.fingerprints["B"]: "B"}.get(fingerprint, "?")


class IndexRace(Race):
    name = "index-race"

    def commands(self, out, wait_s):
        lease = ["--set", f"storage.lease_wait_s={wait_s}"]
        return tuple(lgff("index", "add", "--to", str(self.work / "race-ivf"), "--embeddings",
                          str(self.work / f"race-emb-{w}"), "--out", str(out), *lease) for w in ("a", "b"))

    def published_ok(self, out):
        return IndexBuild.published_ok(self, out)

    def writer_of(self, out):
        if not (out / "index.json").exists():
            return None
        held = json.loads((out / "index.json").read_text())["holds"][-1]["embeddings"]
        return {"race-emb-a": "A", "race-emb-b": "B"}.get(Path(held).name, "?")


def setup_races(work: Path, races: list[str]) -> dict:
    """Inputs of the races; returns the embeddings fingerprint of each embed writer (to tell whose output won)."""
    import numpy as np

    fingerprints = {}
    if "embed-race" in races:
        make_tree(work / "race-tree", n=240)
        r = run(lgff("prep", "imagefolder", "--src", str(work / "race-tree"), "--out", str(work / "race-data"),
                     "--no-progress", "--split-fractions", "train=0.75,val=0.25"))
        assert r.returncode == 0, r.stderr
        for who, size in (("A", "32"), ("B", "48")):
            out = work / f"race-embed-{who}"
            settings = [a.replace("image_size=32", f"image_size={size}") for a in EMBED_SET]
            r = run(lgff("embed", "--baseline", "--data", str(work / "data"), "--out", str(out), *settings))
            assert r.returncode == 0, r.stderr
            fingerprints[who] = json.loads((out / "_manifest.json").read_text())["model_fingerprint"]
    if "index-race" in races:
        sys.path.insert(0, str(REPO))
        from lgff_core.data.embeddings import EmbeddingTable, write_embeddings

        rng = np.random.default_rng(0)
        for name, n in (("base", 2000), ("a", 200_000), ("b", 200_000)):
            x = rng.normal(size=(n, 32)).astype(np.float32)
            write_embeddings(str(work / f"race-emb-{name}"), EmbeddingTable(
                ids=np.array([f"{name}{i:05d}" for i in range(n)], dtype=object),
                labels=(np.arange(n) % 3).astype(np.int64),
                groups=np.array([f"g{i % 7}" for i in range(n)], dtype=object),
                splits=np.array(["train"] * n, dtype=object), xb=x / np.linalg.norm(x, axis=1, keepdims=True),
                label_names=["c0", "c1", "c2"]), num_shards=2, model="bench", model_fingerprint="bench-f")
        r = run(lgff("index", "build", "--embeddings", str(work / "race-emb-base"), "--factory", "IVF8,Flat",
                     "--out", str(work / "race-ivf")))
        assert r.returncode == 0, r.stderr
    return fingerprints


def _outcome(proc: subprocess.Popen) -> str:
    err = proc.stderr.read() if proc.stderr else ""
    lines = [l for l in err.splitlines() if l.startswith("lgff ")]
    if proc.returncode == 0 and "Traceback" not in err:
        return "ok"
    if proc.returncode == 2 and "Traceback" not in err and len(lines) == 1 and "another writer" in lines[0]:
        return "refused"
    return f"other (exit {proc.returncode}: {(err.strip().splitlines() or [''])[-1][:140]})"


def trial_race(race: Race, trials: int, wait_s: float, rng: random.Random) -> dict:
    out = race.work / f"race-{race.name}"
    clean = race.work / f"race-clean-{race.name}"
    shutil.rmtree(clean, ignore_errors=True)
    t0 = time.perf_counter()
    r = run(race.commands(clean, wait_s)[0])
    clean_s = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{race.name}: clean run failed: {r.stderr.strip().splitlines()[-1:]}")
    result = {"stage": f"{race.name} wait={wait_s:g}", "trials": trials, "ok": 0, "refused": 0, "other": 0,
              "unreadable": 0, "last": 0, "clean_s": clean_s, "notes": []}
    for t in range(trials):
        shutil.rmtree(out, ignore_errors=True)
        cmd_a, cmd_b = race.commands(out, wait_s)
        delay = rng.uniform(0.0, 1.0)
        procs = {"A": subprocess.Popen(cmd_a, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True)}
        time.sleep(delay)
        procs["B"] = subprocess.Popen(cmd_b, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        finished, outcomes = [], {}
        deadline = time.monotonic() + 600
        while len(finished) < 2 and time.monotonic() < deadline:
            for who, proc in procs.items():
                if who not in finished and proc.poll() is not None:
                    finished.append(who)
                    outcomes[who] = _outcome(proc)
                    if race.published_ok(out) is False:  # what a reader finds right after this writer exits
                        result["unreadable"] += 1
                        result["notes"].append(f"trial {t}: unreadable after {who} exited (B started +{delay:.1f} s)")
            time.sleep(0.02)
        for who, proc in procs.items():
            if who not in finished:
                proc.kill()
                proc.wait()
                outcomes[who] = "other (timed out)"
        for who, outcome in outcomes.items():
            key = outcome.split(" ")[0]
            result[key] += 1
            if key == "other":
                result["notes"].append(f"trial {t}: writer {who}: {outcome}")
        winner = race.writer_of(out)
        expected = finished[-1] if all(o == "ok" for o in outcomes.values()) else next(
            (w for w, o in outcomes.items() if o == "ok"), None)
        if winner is not None and winner == expected:
            result["last"] += 1
        elif winner != expected:
            result["notes"].append(f"trial {t}: published output is {winner}'s, expected {expected}'s "
                                   f"({outcomes})")
    return result


def setup(work: Path, stages: list[str]) -> None:
    make_tree(work / "tree")
    check = run(lgff("prep", "imagefolder", "--src", str(work / "tree"), "--out", str(work / "data"), "--no-progress",
                     "--shard-mb", "0.03", "--split-fractions", "train=0.75,val=0.25"))
    assert check.returncode == 0, check.stderr
    (work / "tiny.yaml").write_text(TRAIN_CONFIG)
    if "embed" in stages:
        other = [a.replace("image_size=32", "image_size=48") for a in EMBED_SET]
        r = run(lgff("embed", "--baseline", "--data", str(work / "data"), "--out", str(work / "emb-other"), *other))
        assert r.returncode == 0, r.stderr
    if {"index-build", "index-rebuild"} & set(stages):
        r = run(lgff("embed", "--baseline", "--data", str(work / "data"), "--out", str(work / "emb"), *EMBED_SET))
        assert r.returncode == 0, r.stderr
        r = run(lgff("index", "build", "--embeddings", str(work / "emb"), "--out", str(work / "idx-flat")))
        assert r.returncode == 0, r.stderr


def trial_stage(stage: Stage, trials: int, rng: random.Random) -> dict:
    clean = stage.work / f"clean-{stage.name}"
    stage.prepare(clean)
    t0 = time.perf_counter()
    r = run(stage.command(clean))
    clean_s = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{stage.name}: clean run failed: {r.stderr.strip().splitlines()[-1:]}")
    reference = stage.fingerprint(clean)
    out = stage.work / f"trial-{stage.name}"
    result = {"stage": stage.name, "trials": trials, "recovered": 0, "identical": 0, "lost": 0,
              "clean_s": clean_s, "notes": []}
    for t in range(trials):
        stage.prepare(out)
        delay = stage.kill(out, clean_s, rng)
        ok = stage.published_ok(out)
        mid = stage.mid_write(out)
        if mid:
            result["kills_mid_write"] = result.get("kills_mid_write", 0) + 1
        if ok is False:
            result["lost"] += 1
            result["notes"].append(f"trial {t}: torn output published after a kill at {delay}")
        r = run(stage.command(out, resume=True))
        if r.returncode != 0 or not stage.published_ok(out):
            result["notes"].append(f"trial {t}: rerun failed: {(r.stderr.strip().splitlines() or [''])[-1][:160]}")
            continue
        result["recovered"] += 1
        if stage.fingerprint(out) == reference:
            result["identical"] += 1
        else:
            result["notes"].append(f"trial {t}: rerun differs from the clean run (kill at {delay})")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--lease-waits", default=",".join(f"{w:g}" for w in LEASE_WAITS),
                    help="races: storage.lease_wait_s values to run each race with (seconds, comma-separated)")
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES) - set(RACES)
    if unknown:
        ap.error(f"unknown stage(s) {sorted(unknown)}; known: {', '.join(STAGES + RACES)}")
    races = [s for s in stages if s in RACES]
    stages = [s for s in stages if s in STAGES]
    sys.path.insert(0, str(REPO))
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="lgff-faults-"))
    classes = {"prep": Prep, "embed": Embed, "index-build": IndexBuild, "index-rebuild": IndexRebuild,
               "train": Train, "train-ckpt": TrainCheckpoint}
    rows, race_rows = [], []
    try:
        t0 = time.perf_counter()
        setup(work, stages)
        for name in stages:
            res = trial_stage(classes[name](work), args.trials, rng)
            rows.append(res)
            print(f"{name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if races:
            fingerprints = setup_races(work, races)
            for name in races:
                race = {"embed-race": EmbedRace, "index-race": IndexRace}[name](work)
                race.fingerprints = fingerprints
                for wait_s in (float(w) for w in args.lease_waits.split(",") if w):
                    race_rows.append(trial_race(race, args.trials, wait_s, rng))
                    print(f"{name} wait={wait_s:g}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                          flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if rows:
        print(f"{'stage':<14} {'trials':>6} {'recovered':>9} {'identical':>9} {'lost':>5} {'clean s':>8}")
    for r in rows:
        print(f"{r['stage']:<14} {r['trials']:>6} {r['recovered']:>9} {r['identical']:>9} {r['lost']:>5} "
              f"{r['clean_s']:>8.1f}")
    if race_rows:
        print(f"{'race':<20} {'trials':>6} {'ok':>4} {'refused':>7} {'other':>5} {'unreadable':>10} {'last':>4} "
              f"{'clean s':>8}")
    for r in race_rows:
        print(f"{r['stage']:<20} {r['trials']:>6} {r['ok']:>4} {r['refused']:>7} {r['other']:>5} "
              f"{r['unreadable']:>10} {r['last']:>4} {r['clean_s']:>8.1f}")
    for r in rows + race_rows:
        if "kills_mid_write" in r:
            print(f"  {r['stage']}: {r['kills_mid_write']} of {r['trials']} kills landed while a checkpoint was "
                  f"being written or copied")
        for note in r["notes"]:
            print(f"  {r['stage']}: {note}")


if __name__ == "__main__":
    main()
