"""Omniglot loader: archive layout, dedup across archives, checksums, clear errors, real data."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from free.data import DatasetIntegrityError, DatasetNotFoundError, build_splits
from free.data.omniglot import load_omniglot


def test_reads_archives_and_dedupes_shared_alphabet(fake_omniglot: Path) -> None:
    raw = load_omniglot(fake_omniglot, image_size=28)
    # Greek (6) is in both archives: 6 + 5 + 6 + 7 = 24 distinct characters, 4 drawers each.
    assert len(raw.class_names) == 24
    assert raw.images.shape == (24 * 4, 1, 28, 28) and raw.images.dtype == torch.uint8
    assert torch.bincount(raw.labels).tolist() == [4] * 24
    assert sorted(set(raw.class_groups)) == ["Alpha", "Beta", "Gamma", "Greek"]
    assert raw.class_names.count("Greek/character01") == 1
    assert raw.class_splits is None  # Omniglot has no standard split: it is drawn per seed
    assert set(raw.sources) == {"images_background_small1.zip", "images_background_small2.zip"}
    expected = hashlib.sha256((fake_omniglot / "images_background_small1.zip").read_bytes()).hexdigest()
    assert raw.sources["images_background_small1.zip"] == expected


def test_images_keep_polarity_and_are_resized(fake_omniglot: Path) -> None:
    raw = load_omniglot(fake_omniglot, image_size=20)
    assert raw.images.shape[-2:] == (20, 20)
    # Mostly white background with a dark blob: the mean is high but below pure white.
    mean = raw.images.float().mean().item()
    assert 200 < mean < 255


def test_extracted_folder_gives_same_data_as_zip(fake_omniglot: Path, tmp_path: Path) -> None:
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    for archive in fake_omniglot.glob("*.zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(extracted)
    from_zip = load_omniglot(fake_omniglot, image_size=28)
    from_dir = load_omniglot(extracted, image_size=28)
    assert from_dir.class_names == from_zip.class_names
    assert torch.equal(from_dir.images, from_zip.images)
    assert set(from_dir.sources.values()) == {"directory"}


def test_torchvision_download_folder_is_found(fake_omniglot: Path, tmp_path: Path) -> None:
    root = tmp_path / "tv"
    shutil.copytree(fake_omniglot, root / "omniglot-py")
    assert len(load_omniglot(root).class_names) == 24


def test_unknown_archive_names_are_ignored(fake_omniglot: Path) -> None:
    (fake_omniglot / "images_background_small2.zip").rename(fake_omniglot / "other.zip")
    raw = load_omniglot(fake_omniglot)
    assert sorted(set(raw.class_groups)) == ["Alpha", "Greek"]


def test_checksum_mismatch_names_the_archive(fake_omniglot: Path) -> None:
    sums = fake_omniglot / "SHA256SUMS"
    lines = [
        ("0" * 64 + "  " + line.split()[1]) if "small2" in line else line for line in sums.read_text().splitlines()
    ]
    sums.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetIntegrityError, match="images_background_small2.zip"):
        load_omniglot(fake_omniglot)


def test_listed_checksums_take_precedence_over_builtin_ones(fake_omniglot: Path) -> None:
    # The fixture's archives carry the real names; only their SHA256SUMS lets them pass.
    assert len(load_omniglot(fake_omniglot).class_names) == 24
    (fake_omniglot / "SHA256SUMS").unlink()
    with pytest.raises(DatasetIntegrityError, match="images_background_small1.zip"):
        load_omniglot(fake_omniglot)


def test_missing_data_says_what_to_put_where(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_omniglot(tmp_path / "nowhere")
    message = str(info.value)
    for needle in ("images_background_small1.zip", "images_background.zip", "FREE_DATA_DIR", "download=true"):
        assert needle in message


def test_download_failure_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    class OfflineOmniglot:  # fault injection: torchvision's download cannot reach the network
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "Omniglot", OfflineOmniglot)
    with pytest.raises(DatasetNotFoundError, match="downloading Omniglot .* failed"):
        load_omniglot(tmp_path, download=True)


@pytest.mark.data
def test_real_archives_have_242_distinct_characters(real_omniglot_root: Path) -> None:
    raw = load_omniglot(real_omniglot_root, image_size=28)
    assert len(raw.class_names) == 242  # 136 + 156 minus the 50 Greek/Latin duplicates
    assert len(raw.labels) == 242 * 20
    assert len(set(raw.class_groups)) == 8
    splits = build_splits(raw, 0.62, 0.165, seed=0)
    assert [splits[s].n_classes for s in ("train", "val", "test")] == [150, 40, 52]
