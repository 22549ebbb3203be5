"""Webdataset shards as img2dataset writes them: splitting over ranks and workers, buckets, a fuzz corpus of bad
inputs, a resumed stream that continues exactly, and manifests / Hugging Face datasets as sources."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.config import DataConfig
from sdtrain.data.buckets import make_buckets, nearest_bucket
from sdtrain.data.decode import DataError, Skip, SkipCounter, decode_image, probe_size
from sdtrain.data.shards import ShardDataset, ShardPosition, expand_urls, make_shard_loader, open_shard
from sdtrain.data.sources import list_records

SIZES = [(64, 64), (96, 48), (48, 96), (80, 64), (64, 80), (120, 40)]


def _jpeg(size, colour=(200, 30, 30), mode="RGB", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else None).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _png(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save)
    return buffer.getvalue()


def write_shards(root: Path, shards: int = 6, per_shard: int = 10) -> str:
    """img2dataset's layout, written with webdataset.ShardWriter: {key}.jpg, {key}.txt, {key}.json."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(root / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(shards * per_shard):
            size = SIZES[i % len(SIZES)]
            key = f"{i // per_shard:05d}{i % per_shard:04d}"
            meta = {
                "url": f"https://example.com/{i}.jpg",
                "caption": f"image {i}",
                "width": size[0],
                "height": size[1],
            }
            sink.write({"__key__": key, "jpg": _jpeg(size, (i * 4 % 256, 80, 160)), "txt": f"image {i}",
                        "json": json.dumps(meta)})  # fmt: skip
    return str(root / f"{{00000..{shards - 1:05d}}}.tar")


def _config(path: str, **kw) -> DataConfig:
    return DataConfig(path=path, resolution=kw.pop("resolution", 64), **kw)


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_ranks_and_workers_read_disjoint_shards_that_cover_all(tmp_path):
    spec = write_shards(tmp_path / "s", shards=8)
    urls = expand_urls(spec)
    assert len(urls) == 8
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            dataset = ShardDataset(_config(spec), 4, seed=1, rank=rank, world_size=2, num_workers=2)
            for worker in range(2):
                seen.append(set(dataset.shards(epoch, worker)))
        assert sum(len(s) for s in seen) == 8 and set().union(*seen) == set(urls)  # disjoint and complete
    # and the samples they actually read in an epoch: every key once, across 2 ranks x 2 workers
    keys = []
    for rank in range(2):
        dataset = ShardDataset(_config(spec), 4, seed=1, rank=rank, world_size=2, num_workers=2)
        for worker in range(2):
            keys += _keys(dataset._epoch(0, worker, None))
    assert sorted(keys) == sorted(f"{s:05d}{i:04d}" for s in range(8) for i in range(10))
    with pytest.raises(ValueError, match="cannot feed"):
        ShardDataset(_config(spec), 4, rank=0, world_size=3, num_workers=3)


def test_stream_yields_bucketed_rgb_batches_and_every_sample_once_per_epoch(tmp_path):
    spec = write_shards(tmp_path / "s")
    config = _config(spec, buckets=True, bucket_step=16, shuffle_buffer=7)
    dataset = ShardDataset(config, 4, seed=0, num_workers=2)
    config.num_workers = 2
    loader = iter(make_shard_loader(dataset))
    batches, epoch_keys = [], []
    while True:
        batch = next(loader)
        batches.append(batch)
        if batch["state"]["epoch"] > 0 and all(b["state"]["epoch"] > 0 for b in batches[-2:]):
            break
    for batch in batches:
        n, c, h, w = batch["image"].shape
        assert c == 3 and (w, h) in dataset.buckets and n == len(batch["text"]) <= 4
        assert (w, h) == nearest_bucket(tuple(batch["original_size"][0][::-1]), dataset.buckets)
        epoch_keys += batch["key"]
    first_epoch = [k for b in batches if b["state"]["epoch"] == 0 or b is batches[-1] for k in b["key"]]
    assert len(set(epoch_keys)) == 60  # every sample, each with its own bucket
    assert len(first_epoch) <= 60 + 8


def test_resumed_stream_sees_the_same_remaining_keys_in_order(tmp_path):
    spec = write_shards(tmp_path / "s")
    config = _config(spec, buckets=True, bucket_step=16, shuffle_buffer=7, num_workers=2)

    def stream(state=None):
        position = ShardPosition(2, state)
        dataset = ShardDataset(config, 3, 5, 0, 1, 2, position.states, position.next_worker)
        return position, iter(make_shard_loader(dataset))

    _, straight = stream()
    reference = [next(straight) for _ in range(40)]  # crosses the epoch boundary
    for cut in (3, 8, 17, 22):
        position, loader = stream()
        for _ in range(cut):
            position.consumed(next(loader))
        state = json.loads(json.dumps(position.state()))  # as it goes through a checkpoint
        _, resumed = stream(state)
        rest = [next(resumed) for _ in range(40 - cut)]
        assert _keys(rest) == _keys(reference[cut:]), f"cut at {cut}"
        assert torch.equal(rest[0]["image"], reference[cut]["image"])  # same crops and flips


# ----------------------------------------------------------------------------------------------------------------
# The fuzz corpus


def _bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid PNG header announcing 3.6 G pixels (10 GB as RGB) with a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _exif_jpeg(orientation: int) -> bytes:
    image = Image.new("RGB", (48, 32), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def fuzz_corpus() -> dict[str, tuple[bytes, str, bytes]]:
    """name -> (image bytes, extension, caption bytes); the name ends in ``__`` + the skip reason expected, or
    ``__ok``."""
    good = _jpeg((40, 40))
    palette = Image.new("P", (40, 40))
    palette.putpalette([255, 0, 0] * 256)
    gif_frames = [Image.new("P", (40, 40), i) for i in range(3)]
    gif = io.BytesIO()
    gif_frames[0].save(gif, "GIF", save_all=True, append_images=gif_frames[1:], duration=50, loop=0)
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    i16 = Image.fromarray((np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40).astype(np.uint16))
    assert i16.mode == "I;16"
    return {
        "zero_bytes__empty": (b"", "jpg", b"a caption"),
        "truncated__corrupt": (_jpeg((64, 64))[:200], "jpg", b"a caption"),
        "random_bytes__not_an_image": (os.urandom(2000), "jpg", b"a caption"),
        "bomb__too_large": (_bomb_png(), "png", b"a caption"),
        "cmyk__ok": (_jpeg((40, 40), (0, 255, 255, 0), mode="CMYK"), "jpg", b"a caption"),
        "palette_transparency__ok": (_png(palette, transparency=0), "png", b"a caption"),
        "la__ok": (_png(Image.new("LA", (40, 40), (128, 100))), "png", b"a caption"),
        "rgba__ok": (_png(rgba), "png", b"a caption"),
        "sixteen_bit__ok": (_png(i16), "png", b"a caption"),
        "exif6__ok": (_exif_jpeg(6), "jpg", b"a caption"),
        "exif8__ok": (_exif_jpeg(8), "jpg", b"a caption"),
        "animated_gif__ok": (gif.getvalue(), "gif", b"a caption"),
        "bad_utf8__caption_not_utf8": (good, "jpg", b"\xff\xfe\xfa caption"),
        "empty_caption__empty_caption": (good, "jpg", b"   "),
        "../escape__ok": (good, "jpg", b"a caption"),
        "strip__bad_aspect": (_png(Image.new("RGB", (1, 200_000))), "png", b"a caption"),  # 1 x 200,000 px
        "wide__bad_aspect": (_jpeg((1700, 100)), "jpg", b"a caption"),
    }


def _write_fuzz_tar(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for name, (image, ext, caption) in fuzz_corpus().items():
            for suffix, data in ((ext, image), ("txt", caption)):
                info = tarfile.TarInfo(f"{name}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_fuzz_corpus_through_the_shard_loader(tmp_path, monkeypatch):
    shards = tmp_path / "deep" / "shards"
    shards.mkdir(parents=True)
    _write_fuzz_tar(shards / "00000.tar")
    monkeypatch.chdir(shards)  # a member named ../escape would land in tmp_path/deep if anything extracted it
    before = {p for p in tmp_path.rglob("*")}
    config = _config(str(shards / "00000.tar"), resolution=32, shuffle_buffer=100)
    dataset = ShardDataset(config, 64, seed=0)
    batch = next(iter(make_shard_loader(dataset)))  # the epoch's remainder: every usable sample in one batch
    expected_ok = sorted(n for n in fuzz_corpus() if n.endswith("__ok"))
    assert sorted(batch["key"]) == expected_ok
    assert batch["image"].shape == (len(expected_ok), 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    reasons = sorted(n.rsplit("__", 1)[1] for n in fuzz_corpus() if not n.endswith("__ok"))
    assert sorted(batch["skipped"].elements()) == reasons  # each bad sample counted once, by its reason
    assert {p for p in tmp_path.rglob("*")} == before  # nothing written anywhere


def test_fuzz_corpus_through_a_folder(tmp_path):
    from sdtrain.data.folder import ImageCaptionFolder, collate

    root = tmp_path / "folder"
    root.mkdir()
    for name, (image, ext, caption) in fuzz_corpus().items():
        stem = name.replace("../", "dotdot_")
        (root / f"{stem}.{ext}").write_bytes(image)
        (root / f"{stem}.txt").write_bytes(caption)
    data = ImageCaptionFolder(DataConfig(path=str(root), resolution=32))
    batch = collate([data[i] for i in range(len(data))])
    ok = [n for n in fuzz_corpus() if n.endswith("__ok")]
    assert batch["image"].shape == (len(ok), 3, 32, 32)
    reasons = sorted(n.rsplit("__", 1)[1] for n in fuzz_corpus() if not n.endswith("__ok"))
    assert sorted(batch["skipped"].elements()) == reasons


def _cut_shards(root: Path) -> tuple[str, list[str]]:
    """Three shards of 6; the second cut in the middle of its fourth image (an interrupted download). Returns the
    spec and the keys that can be read: all of the first and third, the second's first three."""
    spec = write_shards(root, shards=3, per_shard=6)
    second = root / "00001.tar"
    with tarfile.open(second) as tar:
        fourth = [m for m in tar.getmembers() if m.name.startswith("000010003")][0]
    second.write_bytes(second.read_bytes()[: fourth.offset_data + 100])
    keys = [f"{s:05d}{i:04d}" for s in (0, 2) for i in range(6)] + [f"00001{i:04d}" for i in range(3)]
    return spec, sorted(keys)


def test_a_truncated_shard_keeps_its_samples_counts_one_bad_shard_and_resumes_exactly(tmp_path):
    spec, readable = _cut_shards(tmp_path / "s")
    config = _config(spec, shuffle_buffer=4, num_workers=1)
    first_epoch = []
    for batch in ShardDataset(config, 2, seed=1):  # endless: to the batch whose state is epoch 1's start
        first_epoch.append(batch)
        if batch["state"]["epoch"] == 1:
            break
    assert sorted(_keys(first_epoch)) == readable  # nothing lost before the cut, nothing after it in other shards
    assert sum((b["skipped"] for b in first_epoch), SkipCounter()) == {"bad_shard": 1}

    def stream(state=None):
        position = ShardPosition(1, state)
        return position, iter(make_shard_loader(ShardDataset(config, 2, 1, 0, 1, 1, position.states, 0)))

    _, straight = stream()
    reference = [next(straight) for _ in range(20)]  # two epochs and more, each with its cut
    for cut in (2, 5, 9):
        position, loader = stream()
        for _ in range(cut):
            position.consumed(next(loader))
        _, resumed = stream(json.loads(json.dumps(position.state())))
        rest = [next(resumed) for _ in range(20 - cut)]
        assert _keys(rest) == _keys(reference[cut:]), f"cut at {cut}"
        assert [dict(b["skipped"]) for b in rest] == [dict(b["skipped"]) for b in reference[cut:]]  # once each


def test_members_over_the_cap_are_skipped_unread_and_gzip_shards_stream_under_it(tmp_path):
    """A 255 KB gzip file named .tar whose member declares 256 MiB: the member is passed over (counted), the
    others are read, and memory stays far below the member's size."""
    shards = tmp_path / "shards"
    shards.mkdir()
    import gzip

    with gzip.open(shards / "00000.tar", "wb") as raw, tarfile.open(fileobj=raw, mode="w|") as tar:
        for key, data in (("a", _jpeg((40, 40))), ("b", None), ("c", _jpeg((40, 40)))):
            for ext, payload in (("jpg", data), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                if payload is None:  # 256 MiB of zeros: a bomb when read into memory
                    info.size = 256 * 2**20
                    tar.addfile(info, io.BytesIO(bytes(info.size)))
                else:
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    assert (shards / "00000.tar").stat().st_size < 400_000
    code = (
        "import resource\n"
        "from sdtrain.data.shards import iterate_shard\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"samples = list(iterate_shard({str(shards / '00000.tar')!r}, max_member_mb=32))\n"
        "print([(s['__key__'], s.get('__skip__')) for s in samples])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    listed, grown_kb = out.stdout.strip().splitlines()[-2:]
    assert listed == "[('a', None), ('b', 'member_too_large'), ('c', None)]", out.stderr[-2000:]
    assert int(grown_kb) < 20_000  # the 256 MiB member was decompressed as a stream, never held
    dataset = ShardDataset(_config(str(shards / "00000.tar"), resolution=32, max_member_mb=1.0), 8)
    batch = next(iter(dataset))
    assert sorted(batch["key"]) == ["a", "c"] and batch["skipped"] == {"member_too_large": 1}


def test_a_file_that_is_not_a_tar_is_a_bad_shard(tmp_path):
    spec = write_shards(tmp_path / "s", shards=2, per_shard=3)
    (tmp_path / "s" / "00000.tar").write_bytes(b"<html>not found</html>")
    batch = next(iter(ShardDataset(_config(spec), 8)))
    assert sorted(batch["key"]) == [f"00001{i:04d}" for i in range(3)] and batch["skipped"] == {"bad_shard": 1}


def test_modes_become_rgb_with_the_right_content():
    corpus = fuzz_corpus()
    rgba = np.asarray(decode_image(corpus["rgba__ok"][0]))
    assert (rgba == 255).all()  # fully transparent red composited on white
    assert decode_image(corpus["exif6__ok"][0]).size == (32, 48)  # rotated: sides swapped
    assert decode_image(corpus["exif8__ok"][0]).size == (32, 48)
    assert probe_size(corpus["exif6__ok"][0]) == (32, 48)  # the header probe agrees, so the bucket is right
    sixteen = np.asarray(decode_image(corpus["sixteen_bit__ok"][0]))
    assert sixteen.dtype == np.uint8 and 0 < sixteen.mean() < 255  # scaled to 8 bits, not clipped to white
    cmyk = decode_image(corpus["cmyk__ok"][0])
    assert cmyk.mode == "RGB"
    with pytest.raises(Skip, match="too_large"):
        probe_size(corpus["bomb__too_large"][0])


def test_bomb_is_refused_without_decoding():
    """In a fresh process, refusing a 10 GB bomb keeps the peak memory where importing PIL leaves it."""
    code = (
        "import resource, sys\n"
        "from tests.test_shards import _bomb_png\n"
        "from sdtrain.data.decode import Skip, decode_image\n"
        "data = _bomb_png()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    decode_image(data)\nexcept Skip as e:\n    print(e.reason)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    reason, grown_kb = out.stdout.split()[-2:]
    assert reason == "too_large" and int(grown_kb) < 20_000, out.stderr[-2000:]


def test_pipe_urls_need_the_flag(tmp_path):
    with pytest.raises(ValueError, match="allow_pipe"):
        open_shard("pipe:cat x.tar")


def test_buckets_cover_the_area():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(max(w / h, h / w) <= 2.0 for w, h in buckets)
    assert nearest_bucket((1920, 1080), buckets) == (640, 384)
    assert nearest_bucket((1080, 1920), buckets) == (384, 640)


# ----------------------------------------------------------------------------------------------------------------
# Other sources


def _images(root: Path, n: int = 4) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(root / f"{i}.png")
        names.append(f"{i}.png")
    return names


def test_csv_jsonl_and_parquet_manifests(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    names = _images(tmp_path / "img")
    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerows([[f"img/{n}", f"csv {n}"] for n in names])
    (tmp_path / "m.jsonl").write_text(
        "".join(json.dumps({"path": f"img/{n}", "caption": f"j {n}"}) + "\n" for n in names)
    )
    blobs = [(tmp_path / "img" / n).read_bytes() for n in names]  # parquet with the image bytes inside
    pq.write_table(pa.table({"path": blobs, "caption": [f"p {n}" for n in names]}), tmp_path / "m.parquet")
    for manifest in ("m.csv", "m.jsonl", "m.parquet"):
        records = list_records(tmp_path / manifest, "path", "caption")
        assert len(records) == 4
        image = decode_image(records[2]["image"])
        assert image.size == (32, 32) and image.getpixel((0, 0)) == (120, 0, 0)
    with pytest.raises(ValueError, match="data.image_column"):
        list_records(tmp_path / "m.csv", "file_name", "caption")


def test_broken_manifest_rows_are_named_or_skipped_and_counted(tmp_path, clip_dir, vae_dir, capsys):
    """A metadata.jsonl line that is not JSON (or not an object) stops `sdtrain train` with one line naming the file
    and line, before any work; with data.skip_bad_rows the rows are skipped and counted (bad_row). A caption that is
    not text is counted as such; a CSV caption over Python's 131,072-character field limit is read."""
    from sdtrain.cli import main
    from sdtrain.data.folder import ImageCaptionFolder, collate
    from tests.conftest import tiny_overrides

    names = _images(tmp_path / "data", n=6)
    rows = [json.dumps({"file_name": n, "text": f"caption {n}"}) for n in names[:4]]
    rows += ['{"file_name": "4.png", "te', "[1, 2]", json.dumps({"file_name": names[5], "text": 5})]
    (tmp_path / "data" / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    overrides = tiny_overrides(tmp_path / "run", tmp_path / "data", vae_dir, str(clip_dir), "text_encoder")
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'data' / 'metadata.jsonl'}:5: not valid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    data = ImageCaptionFolder(DataConfig(path=str(tmp_path / "data"), resolution=32, skip_bad_rows=True))
    batch = collate([data[i] for i in range(len(data))])
    assert len(batch["text"]) == 4 and batch["skipped"] == {"bad_row": 2, "caption_not_text": 1}

    import csv

    long_caption = "a very long caption " * 10_000  # 200,000 characters
    with open(tmp_path / "data" / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "text"], ["0.png", long_caption], ["1.png", "short"]])
    records = list_records(tmp_path / "data" / "m.csv")
    assert [len(r["caption"]) for r in records] == [len(long_caption), 5]
    huge = "x" * (2 << 20)  # over the 1 MiB field cap: a file that is not a caption list
    (tmp_path / "data" / "n.csv").write_text(f"file_name,text\n0.png,fine\n1.png,{huge}\n2.png,ok\n")
    with pytest.raises(DataError, match=r"n.csv:3: not a readable CSV row \(field larger than field limit"):
        list_records(tmp_path / "data" / "n.csv")
    kept = list_records(tmp_path / "data" / "n.csv", skip_bad_rows=True)
    assert [r["caption"] if isinstance(r["caption"], str) else r["caption"].reason for r in kept] == [
        "fine",
        "bad_row",
        "ok",
    ]


def _hf_dataset(tmp_path: Path, prefix: str):
    """4 images (red 0, 60, 120, 180) with captions "PREFIX i.png", as a datasets.Dataset with an Image feature."""
    import datasets

    names = _images(tmp_path / "img")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"image": [str(tmp_path / "img" / n) for n in names], "text": [f"{prefix} {n}" for n in names]},
        features=features,
    )


def test_huggingface_dataset_saved_to_disk(tmp_path):
    _hf_dataset(tmp_path, "hf").save_to_disk(tmp_path / "hf")
    records = list_records(tmp_path / "hf")
    assert len(records) == 4 and records[1]["caption"] == "hf 1.png"
    assert decode_image(records[3]["image"]).getpixel((0, 0)) == (180, 0, 0)


def test_training_from_shards_with_buckets_resumes_exactly(tmp_path, clip_dir, vae_dir):
    from safetensors.torch import load_file

    from sdtrain.config import Config, load_config
    from sdtrain.train.loop import train
    from tests.conftest import tiny_overrides

    spec = write_shards(tmp_path / "s", shards=4, per_shard=6)
    extra = ["data.resolution=64", "data.buckets=true", "data.bucket_step=16", "data.shuffle_buffer=5"]
    extra += ["data.num_workers=2", "train.num_steps=6", "train.save_every=3"]
    runs = {}
    for name in ("straight", "split"):
        overrides = tiny_overrides(tmp_path / name, spec, vae_dir, str(clip_dir), "text_encoder") + extra
        if name == "split":
            train(load_config(Config, None, overrides + ["train.num_steps=3"]))
        runs[name] = train(load_config(Config, None, overrides))
    a, b = (load_file(runs[n] / "unet" / "diffusion_pytorch_model.safetensors") for n in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert set(state["data"][0]["workers"]) == {"0", "1"}  # both workers' positions are in the checkpoint


def test_fsspec_urls_are_read(tmp_path):
    import fsspec

    spec = write_shards(tmp_path / "s", shards=2, per_shard=3)
    memory = fsspec.filesystem("memory")
    for url in expand_urls(spec):
        memory.pipe(f"/shards/{Path(url).name}", Path(url).read_bytes())
    dataset = ShardDataset(_config("memory://shards/{00000..00001}.tar"), 6)
    batch = next(iter(dataset))
    assert sorted(batch["key"]) == sorted(f"{s:05d}{i:04d}" for s in range(2) for i in range(3))


def test_mixed_sources_follow_their_weights_and_resume(tmp_path, clip_dir, vae_dir):
    from safetensors.torch import load_file

    from sdtrain.config import Config, load_config
    from sdtrain.data.streams import MixedStream
    from sdtrain.train.loop import train
    from tests.conftest import tiny_overrides, write_image_folder

    class Counting:
        def __init__(self, name):
            self.name, self.skipped = name, {}

        def next(self, draws):
            return self.name

    mixed = MixedStream([Counting("a"), Counting("b")], [3.0, 1.0], seed=0)
    picks = [mixed.next(None) for _ in range(4000)]
    assert abs(picks.count("a") / 4000 - 0.75) < 0.03

    folder = write_image_folder(tmp_path / "folder", count=8, size=64)
    spec = write_shards(tmp_path / "s", shards=2, per_shard=6)
    extra = ["data.resolution=32", "data.weight=1.0", f"data.datasets=[{{path: '{spec}', weight: 1.0}}]"]
    extra += ["train.num_steps=6"]
    extra += ["train.save_every=3", "data.random_flip=true"]
    runs = {}
    for name in ("straight", "split"):
        overrides = tiny_overrides(tmp_path / name, folder, vae_dir, str(clip_dir), "text_encoder") + extra
        if name == "split":
            train(load_config(Config, None, overrides + ["train.num_steps=3"]))
        runs[name] = train(load_config(Config, None, overrides))
    a, b = (load_file(runs[n] / "unet" / "diffusion_pytorch_model.safetensors") for n in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-00000006" / "state.json").read_text())
    folder_state, shard_state = state["data"][0]["streams"]
    assert state["data"][0]["count"] == 6 and folder_state["read"] > 0 and shard_state["read"] > 0  # both drawn


def test_huggingface_dataset_by_path_through_load_dataset(tmp_path):
    (tmp_path / "repo").mkdir()
    _hf_dataset(tmp_path, "hub").to_parquet(
        tmp_path / "repo" / "train.parquet"
    )  # a dataset repository's layout, loaded by load_dataset
    records = list_records(f"hf:{tmp_path / 'repo'}")
    assert len(records) == 4 and records[2]["caption"] == "hub 2.png"
    assert decode_image(records[2]["image"]).getpixel((0, 0)) == (120, 0, 0)
