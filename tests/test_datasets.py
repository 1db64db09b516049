"""Manifests: every source on tiny fake trees with the real file names and metadata formats."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from tile2audio import Tile2AudioError
from tile2audio.datasets import (
    MANIFEST_COLUMNS,
    SOURCES,
    build_manifest,
    read_manifest,
    resolve_paths,
    validate_manifest,
    write_manifest,
)

from conftest import SHARED_DATASETS as SHARED


def _schema_ok(df: pd.DataFrame) -> None:
    """The schema columns come first, in order, with the documented dtypes."""
    assert tuple(df.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    assert str(df["fold"].dtype) == "Int64"
    for col in ("clip_id", "path", "root", "label", "split", "group"):
        assert all(isinstance(v, str) for v in df[col]), col
    assert df["clip_id"].is_unique
    assert all(Path(r).is_absolute() for r in df["root"])
    assert not any("\\" in p or Path(p).is_absolute() for p in df["path"])


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ----------------------------------------------------------------------------- GTZAN

def _gtzan_tree(root: Path, write_audio, tone_fn, sub="genres_original", ext="wav", per_genre=3,
                genres=("blues", "jazz")) -> Path:
    for g in genres:
        start = 53 if g == "jazz" else 0
        for i in range(start, start + per_genre):
            write_audio(root / sub / g / f"{g}.{i:05d}.{ext}", tone_fn(0.2, sr=8000, freq=200 + i), sr=8000)
    return root


def _gtzan_splits(split_dir: Path, ext="wav") -> Path:
    split_dir.mkdir(parents=True)
    (split_dir / "train_filtered.txt").write_text(f"blues/blues.00000.{ext}\njazz/jazz.00053.{ext}\n")
    (split_dir / "valid_filtered.txt").write_text(f"blues/blues.00001.{ext}\r\n\r\n")
    (split_dir / "test_filtered.txt").write_text(f"jazz/jazz.00055.{ext}\nrock/rock.00007.{ext}\n")
    return split_dir


def test_gtzan_split_lists_and_unreadable_jazz54(tmp_path, write_audio, tone_fn, caplog):
    root = _gtzan_tree(tmp_path / "gtzan", write_audio, tone_fn)
    (root / "genres_original/jazz/jazz.00054.wav").write_bytes(b"")  # the known bad copy
    (root / "genres_original/jazz/readme.txt").write_text("not audio")
    split_dir = _gtzan_splits(tmp_path / "splits")
    with caplog.at_level(logging.WARNING):
        df = build_manifest("gtzan", root, split_dir=split_dir, progress=False)
    _schema_ok(df)
    assert df["clip_id"].tolist() == ["blues.00000", "blues.00001", "blues.00002",
                                      "jazz.00053", "jazz.00054", "jazz.00055"]
    assert df["path"].iloc[0] == "genres_original/blues/blues.00000.wav"
    assert set(df["label"]) == {"blues", "jazz"}
    split = dict(zip(df["clip_id"], df["split"]))
    assert split == {"blues.00000": "train", "jazz.00053": "train", "blues.00001": "valid",
                     "jazz.00055": "test", "blues.00002": "", "jazz.00054": ""}
    assert df["fold"].isna().all()
    note = dict(zip(df["clip_id"], df["note"]))
    assert note["jazz.00054"] == "unreadable"
    assert all(v == "" for k, v in note.items() if k != "jazz.00054")
    text = _warnings(caplog)
    assert "jazz.00054" in text and "unreadable" in text
    assert "none of the filtered split lists" in text and "rock.00007" in text
    assert all(p.is_file() for p in resolve_paths(df))


def test_gtzan_au_layout_matches_wav_lists(tmp_path, write_audio, tone_fn):
    root = _gtzan_tree(tmp_path / "gtzan", write_audio, tone_fn, sub="genres", ext="au")
    df = build_manifest("gtzan", root, split_dir=_gtzan_splits(tmp_path / "splits", ext="wav"),
                        progress=False)
    assert df["path"].str.endswith(".au").all()
    assert df["path"].iloc[0] == "genres/blues/blues.00000.au"
    assert (df["note"] == "").all()  # .au decodes with libsndfile
    assert dict(zip(df["clip_id"], df["split"]))["jazz.00055"] == "test"


def test_gtzan_without_splits_warns_and_stratifies(tmp_path, write_audio, tone_fn, caplog):
    genres = ("blues", "classical", "jazz", "rock")
    root = _gtzan_tree(tmp_path / "gtzan", write_audio, tone_fn, per_genre=5, genres=genres)
    with caplog.at_level(logging.WARNING):
        df = build_manifest("gtzan", root, n_folds=5, seed=3, progress=False)
    assert "leak artists" in _warnings(caplog)
    assert (df["split"] == "").all()
    assert sorted(df["fold"].unique()) == [1, 2, 3, 4, 5]
    # stratified: every fold holds exactly one clip of each genre
    assert (pd.crosstab(df["fold"], df["label"]) == 1).all().all()
    again = build_manifest("gtzan", root, n_folds=5, seed=3, progress=False)
    assert again["fold"].tolist() == df["fold"].tolist()
    other = build_manifest("gtzan", root, n_folds=5, seed=4, progress=False)
    assert other["fold"].tolist() != df["fold"].tolist()


def test_gtzan_errors(tmp_path, write_audio, tone_fn):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Tile2AudioError, match="does not look like GTZAN"):
        build_manifest("gtzan", tmp_path / "empty")
    root = _gtzan_tree(tmp_path / "gtzan", write_audio, tone_fn)
    split_dir = _gtzan_splits(tmp_path / "splits")
    (split_dir / "valid_filtered.txt").unlink()
    with pytest.raises(Tile2AudioError, match="valid_filtered.txt"):
        build_manifest("gtzan", root, split_dir=split_dir, progress=False)
    (split_dir / "valid_filtered.txt").write_text("blues/blues.00000.wav\n")
    with pytest.raises(Tile2AudioError, match="blues.00000"):
        build_manifest("gtzan", root, split_dir=split_dir, progress=False)


# ----------------------------------------------------------------------------- FMA

_FMA_COLUMNS = [("album", "id"), ("album", "title"), ("artist", "id"), ("artist", "name"),
                ("set", "split"), ("set", "subset"), ("track", "duration"), ("track", "genre_top"),
                ("track", "title")]
# track_id: (artist id, split, subset, genre_top)
_FMA_TRACKS = {
    2: ("1", "training", "small", "Hip-Hop"),
    5: ("1", "validation", "small", "Hip-Hop"),
    140: ("2", "test", "small", "Folk"),
    99134: ("3", "training", "small", "Rock"),
    108925: ("4", "test", "small", "Rock"),
    1000: ("5", "training", "medium", "Rock"),
    3000: ("6", "validation", "medium", "Jazz"),
    2000: ("7", "training", "large", ""),
}


def _fma_tree(root: Path, write_audio, tone_fn) -> Path:
    """tracks.csv in its real layout: two header rows, then a 'track_id,,,' row."""
    lines = ["," + ",".join(a for a, _ in _FMA_COLUMNS), "," + ",".join(b for _, b in _FMA_COLUMNS),
             "track_id" + "," * len(_FMA_COLUMNS)]
    for tid, (artist, split, subset, genre) in _FMA_TRACKS.items():
        lines.append(f"{tid},{tid % 7},Album {tid},{artist},Artist {artist},{split},{subset},30,{genre},"
                     f'"Title, {tid}"')
    meta = root / "fma_metadata" / "tracks.csv"
    meta.parent.mkdir(parents=True)
    meta.write_text("\n".join(lines) + "\n")
    rank = {"small": 0, "medium": 1, "large": 2}
    for folder in ("small", "medium"):
        for tid, (_, _, subset, _) in _FMA_TRACKS.items():
            if rank[subset] > rank[folder] or tid == 108925:  # 108925 is missing on disk
                continue
            path = root / f"fma_{folder}" / f"{tid // 1000:03d}" / f"{tid:06d}.mp3"
            if tid == 3000:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")
            else:
                write_audio(path, tone_fn(0.2, sr=8000), sr=8000)
    return root


def test_fma_small_split_labels_groups_and_bad_tracks(tmp_path, write_audio, tone_fn, caplog):
    root = _fma_tree(tmp_path / "fma", write_audio, tone_fn)
    with caplog.at_level(logging.WARNING):
        df = build_manifest("fma", root, subset="small", progress=False)
    _schema_ok(df)
    assert df["clip_id"].tolist() == ["000002", "000005", "000140", "099134"]
    assert df["path"].tolist() == ["fma_small/000/000002.mp3", "fma_small/000/000005.mp3",
                                   "fma_small/000/000140.mp3", "fma_small/099/099134.mp3"]
    assert df["split"].tolist() == ["train", "valid", "test", "train"]
    assert df["label"].tolist() == ["Hip-Hop", "Hip-Hop", "Folk", "Rock"]
    assert df["group"].tolist() == ["1", "1", "2", "3"]
    assert df["note"].tolist() == ["", "", "", "known bad: no usable audio"]
    text = _warnings(caplog)
    assert "dropped 1 track(s)" in text and "108925" in text
    assert "099134" in text
    assert all(p.is_file() for p in resolve_paths(df))


def test_fma_medium_is_cumulative(tmp_path, write_audio, tone_fn):
    root = _fma_tree(tmp_path / "fma", write_audio, tone_fn)
    df = build_manifest("fma", root, subset="medium", progress=False)
    assert df["clip_id"].tolist() == ["000002", "000005", "000140", "001000", "003000", "099134"]
    assert df["path"].str.startswith("fma_medium/").all()
    assert dict(zip(df["clip_id"], df["subset"]))["001000"] == "medium"
    assert dict(zip(df["clip_id"], df["note"]))["003000"] == "zero-byte"
    assert "002000" not in set(df["clip_id"])  # large only


def test_fma_errors(tmp_path, write_audio, tone_fn):
    root = _fma_tree(tmp_path / "fma", write_audio, tone_fn)
    with pytest.raises(Tile2AudioError, match="fma_large"):
        build_manifest("fma", root, subset="large", progress=False)
    with pytest.raises(Tile2AudioError, match="subset"):
        build_manifest("fma", root, subset="tiny")
    (tmp_path / "nometa").mkdir()
    with pytest.raises(Tile2AudioError, match="tracks.csv"):
        build_manifest("fma", tmp_path / "nometa")


# ----------------------------------------------------------------------------- DCASE 2018

def _dcase_tree(root: Path, write_audio, tone_fn) -> Path:
    clips = [  # (file, label, session)
        ("audio/DevNode1_ex1_1.wav", "absence", "absence_1"),
        ("audio/DevNode2_ex1_2.wav", "absence", "absence_1"),
        ("audio/DevNode1_ex2_1.wav", "cooking", "cooking_1"),
        ("audio/DevNode3_ex2_2.wav", "cooking", "cooking_1"),
        ("audio/DevNode4_ex3_1.wav", "working", "working_1"),
        ("audio/DevNode1_ex4_1.wav", "vacuum_cleaner", "vacuum_1"),
        ("audio/DevNode2_ex5_1.wav", "singing", "singing_1"),  # not a task-5 label
        ("audio/DevNode2_ex6_1.wav", "eating", "eating_1"),    # listed but missing on disk
    ]
    for f, _, _ in clips[:-1]:
        write_audio(root / f, tone_fn(0.2, sr=16000, channels=4), sr=16000)
    (root / "meta.txt").write_text("".join(f"{f}\t{lab}\t{s}\n" for f, lab, s in clips))
    setup = root / "evaluation_setup"
    setup.mkdir()
    evaluated = {1: clips[0:2], 2: clips[2:4], 3: clips[4:5], 4: clips[5:6]}
    for fold, rows in evaluated.items():
        others = [c for c in clips if c not in rows]
        (setup / f"fold{fold}_train.txt").write_text("".join(f"{f}\t{lab}\t{s}\n" for f, lab, s in others))
        # some evaluate files carry the session, some do not
        (setup / f"fold{fold}_evaluate.txt").write_text(
            "".join(f"{f}\t{lab}" + (f"\t{s}" if fold % 2 else "") + "\n" for f, lab, s in rows))
        (setup / f"fold{fold}_test.txt").write_text("".join(f"{f}\n" for f, _, _ in rows))
    return root


def test_dcase2018_folds_sessions_nodes(tmp_path, write_audio, tone_fn, caplog):
    root = _dcase_tree(tmp_path / "dcase", write_audio, tone_fn)
    with caplog.at_level(logging.WARNING):
        df = build_manifest("dcase2018", root, progress=False)
    _schema_ok(df)
    assert list(df.columns) == list(MANIFEST_COLUMNS) + ["node"]
    assert len(df) == 7
    rows = df.set_index("clip_id")
    assert rows.loc["DevNode1_ex1_1", "path"] == "audio/DevNode1_ex1_1.wav"
    assert {k: None if pd.isna(v) else int(v) for k, v in rows["fold"].items()} == {
        "DevNode1_ex1_1": 1, "DevNode2_ex1_2": 1, "DevNode1_ex2_1": 2, "DevNode3_ex2_2": 2,
        "DevNode4_ex3_1": 3, "DevNode1_ex4_1": 4, "DevNode2_ex5_1": None}
    assert rows.loc["DevNode3_ex2_2", "group"] == "cooking_1"
    assert rows.loc["DevNode3_ex2_2", "node"] == 3
    assert rows.loc["DevNode1_ex4_1", "label"] == "vacuum_cleaner"
    assert (df["split"] == "").all()
    text = _warnings(caplog)
    assert "singing" in text
    assert "dropped 1 clip(s)" in text and "DevNode2_ex6_1" in text


def test_dcase2018_needs_meta(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(Tile2AudioError, match="meta.txt"):
        build_manifest("dcase2018", tmp_path / "d")


# ----------------------------------------------------------------------------- folder

def test_folder_labels_from_parent_and_ignores_non_audio(tmp_path, write_audio, tone_fn):
    root = tmp_path / "music"
    y = tone_fn(0.2, sr=8000)
    write_audio(root / "rock" / "b.wav", y, sr=8000)
    write_audio(root / "rock" / "a.flac", y, sr=8000)
    write_audio(root / "live" / "jazz" / "c.ogg", y, sr=8000)
    write_audio(root / "loose.wav", y, sr=8000)
    write_audio(root / "rock" / ".hidden.wav", y, sr=8000)
    (root / "labels.csv").write_text("path,genre\n")
    (root / "rock" / "cover.jpg").write_bytes(b"\xff\xd8")
    df = build_manifest("folder", root)
    _schema_ok(df)
    assert df["path"].tolist() == ["live/jazz/c.ogg", "loose.wav", "rock/a.flac", "rock/b.wav"]
    assert df["clip_id"].tolist() == ["live/jazz/c", "loose", "rock/a", "rock/b"]
    assert df["label"].tolist() == ["jazz", "", "rock", "rock"]
    assert df["fold"].isna().all() and (df["split"] == "").all()
    only_wav = build_manifest("folder", root, extensions=["WAV"])
    assert only_wav["path"].tolist() == ["loose.wav", "rock/b.wav"]


def test_folder_same_name_two_extensions_keeps_ids_unique(tmp_path, write_audio, tone_fn):
    root = tmp_path / "x"
    write_audio(root / "a" / "s.wav", tone_fn(0.2, sr=8000), sr=8000)
    write_audio(root / "a" / "s.flac", tone_fn(0.2, sr=8000), sr=8000)
    df = build_manifest("folder", root)
    assert df["clip_id"].tolist() == ["a/s.flac", "a/s.wav"]


def test_folder_without_audio_errors(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("x")
    with pytest.raises(Tile2AudioError, match="no audio files"):
        build_manifest("folder", tmp_path / "e")


# ----------------------------------------------------------------------------- csv

def _csv_tree(root: Path, write_audio, tone_fn) -> Path:
    for name in ("a.wav", "b.wav", "c.wav", "d.wav"):
        write_audio(root / "clips" / name, tone_fn(0.2, sr=8000), sr=8000)
    csv = root / "labels.csv"
    csv.write_text(
        "file,cls,fold,src,set,label,comment\n"
        "clips/a.wav,dog,fold1,s1,Training,x,first\n"
        "clips/b.wav,cat,2,s1,VAL,y,\n"
        "clips/c.wav,dog,Fold 3,s2,eval,z,third\n"
        "clips/d.wav,cat,,s3,,w,\n"
        "clips/missing.wav,cat,1,s4,train,v,\n"
    )
    return csv


def test_csv_maps_columns_folds_splits_and_keeps_extras(tmp_path, write_audio, tone_fn, caplog):
    csv = _csv_tree(tmp_path / "data", write_audio, tone_fn)
    with caplog.at_level(logging.WARNING):
        df = build_manifest("csv", csv, path_column="file", label_column="cls", fold_column="fold",
                            group_column="src", split_column="set")
    _schema_ok(df)
    assert df["clip_id"].tolist() == ["clips/a", "clips/b", "clips/c", "clips/d"]
    assert df["label"].tolist() == ["dog", "cat", "dog", "cat"]
    assert df["fold"].tolist()[:3] == [1, 2, 3] and pd.isna(df["fold"].iloc[3])
    assert df["split"].tolist() == ["train", "valid", "test", ""]
    assert df["group"].tolist() == ["s1", "s1", "s2", "s3"]
    assert df["root"].iloc[0] == str(csv.parent)
    # unmapped columns are extras; one named like a schema column is renamed
    assert list(df.columns[len(MANIFEST_COLUMNS):]) == ["orig_label", "comment"]
    assert df["comment"].tolist() == ["first", "", "third", ""]
    assert "dropped 1 row(s)" in _warnings(caplog)


def test_csv_root_option_and_clip_id_column(tmp_path, write_audio, tone_fn, caplog):
    data = tmp_path / "audio"
    write_audio(data / "x.wav", tone_fn(0.2, sr=8000), sr=8000)
    write_audio(data / "y.wav", tone_fn(0.2, sr=8000), sr=8000)
    csv = tmp_path / "meta" / "list.csv"
    csv.parent.mkdir()
    csv.write_text(f"path,id\nx.wav,first\n{data / 'y.wav'}\tsecond\n".replace("\t", ","))
    df = build_manifest("csv", csv, root=data, clip_id_column="id")
    assert df["clip_id"].tolist() == ["first", "second"]
    assert df["path"].tolist() == ["x.wav", "y.wav"]  # absolute path made relative to root
    assert df["root"].iloc[0] == str(data)
    with caplog.at_level(logging.WARNING):
        df = build_manifest("csv", csv)  # x.wav is not relative to the CSV's folder
    assert df["path"].tolist() == [(data / "y.wav").as_posix()]
    assert "kept absolute" in _warnings(caplog) and "dropped 1 row(s)" in _warnings(caplog)
    assert resolve_paths(df) == [data / "y.wav"]
    csv.write_text("path\nx.wav\ny.wav\n")
    with pytest.raises(Tile2AudioError, match="none of the 2 audio paths"):
        build_manifest("csv", csv)


@pytest.mark.parametrize("column,value,pattern", [
    ("fold", "one", "fold 'one'"),
    ("fold", "1.5", "fold '1.5'"),
    ("set", "holdout", "'holdout'"),
])
def test_csv_bad_values_are_clear_errors(tmp_path, write_audio, tone_fn, column, value, pattern):
    write_audio(tmp_path / "a.wav", tone_fn(0.2, sr=8000), sr=8000)
    csv = tmp_path / "l.csv"
    row = {"path": "a.wav", "fold": "1", "set": "train"}
    row[column] = value
    csv.write_text("path,fold,set\n" + ",".join(row.values()) + "\n")
    with pytest.raises(Tile2AudioError, match=pattern):
        build_manifest("csv", csv, fold_column="fold", split_column="set")


def test_csv_missing_column_lists_columns(tmp_path, write_audio, tone_fn):
    csv = _csv_tree(tmp_path / "data", write_audio, tone_fn)
    with pytest.raises(Tile2AudioError, match="no column 'genre'.*file, cls"):
        build_manifest("csv", csv, path_column="file", label_column="genre")
    with pytest.raises(Tile2AudioError, match="no column 'path'"):
        build_manifest("csv", csv)


# ----------------------------------------------------------------------------- build_manifest

def test_build_manifest_errors(tmp_path):
    assert set(SOURCES) == {"gtzan", "fma", "dcase2018", "folder", "csv"}
    with pytest.raises(Tile2AudioError, match="known sources: gtzan, fma, dcase2018, folder, csv"):
        build_manifest("musicnet", tmp_path)
    with pytest.raises(Tile2AudioError, match="not found"):
        build_manifest("folder", tmp_path / "nope")
    with pytest.raises(Tile2AudioError, match="does not take option.*split_dir.*it takes: subset"):
        build_manifest("fma", tmp_path, split_dir="x")


# ----------------------------------------------------------------------------- read / write

def _manifest() -> pd.DataFrame:
    return pd.DataFrame({
        "clip_id": ["a", "b", "c"], "path": ["x/a.wav", "x/b.wav", "c.wav"], "root": ["/data"] * 3,
        "label": ["dog", "", "cat"], "split": ["train", "", "test"], "fold": [1, None, 3],
        "group": ["g1", "", "g2"], "note": ["", "unreadable", ""],
    })


def test_write_read_round_trip(tmp_path):
    out = write_manifest(_manifest(), tmp_path / "sub" / "m.csv")
    df = read_manifest(out)
    _schema_ok(df)
    assert df["fold"].tolist()[0] == 1 and pd.isna(df["fold"].iloc[1]) and df["fold"].iloc[2] == 3
    assert df["label"].tolist() == ["dog", "", "cat"]
    assert df["note"].tolist() == ["", "unreadable", ""]
    assert list(df.columns) == list(MANIFEST_COLUMNS) + ["note"]
    assert resolve_paths(df) == [Path("/data/x/a.wav"), Path("/data/x/b.wav"), Path("/data/c.wav")]
    assert resolve_paths(df, root=tmp_path)[2] == tmp_path / "c.wav"
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["m.csv"]  # no temp files left


def test_validate_reorders_columns_and_normalises(tmp_path):
    df = _manifest()[["note", "fold", "label", "group", "split", "root", "path", "clip_id"]]
    df["fold"] = ["1", "", "3.0"]
    clean = validate_manifest(df)
    assert list(clean.columns) == list(MANIFEST_COLUMNS) + ["note"]
    assert clean["fold"].tolist()[::2] == [1, 3]


def test_validate_required_subset_fills_the_other_columns():
    df = pd.DataFrame({"path": ["a.wav", "b.wav"], "clip_id": ["a", "b"], "extra": [1, 2]})
    clean = validate_manifest(df, required=("clip_id", "path"))
    assert list(clean.columns) == list(MANIFEST_COLUMNS) + ["extra"]
    assert clean["label"].tolist() == ["", ""] and clean["fold"].isna().all()
    with pytest.raises(Tile2AudioError, match="missing required column.*label"):
        validate_manifest(df)
    with pytest.raises(Tile2AudioError, match="'split'.*'training'"):
        validate_manifest(df.assign(split=["training", ""]), required=("clip_id", "path"))


@pytest.mark.parametrize("edit,pattern", [
    (lambda d: d.drop(columns=["split"]), "missing required column.*split"),
    (lambda d: d.assign(clip_id=["a", "a", "c"]), "'clip_id' must be unique.*'a'"),
    (lambda d: d.assign(clip_id=["a", "", "c"]), "'clip_id' is empty at data row 2"),
    (lambda d: d.assign(path=["x", "y", ""]), "'path' is empty at data row 3"),
    (lambda d: d.assign(split=["train", "training", ""]), "'split'.*'training'.*data row 2"),
    (lambda d: d.assign(fold=["1", "1.5", ""]), "'fold'.*'1.5'.*data row 2"),
    (lambda d: d.assign(fold=["one", "", ""]), "'fold'.*'one'.*data row 1 \\(clip_id 'a'\\)"),
])
def test_read_manifest_rejects_malformed(tmp_path, edit, pattern):
    path = tmp_path / "bad.csv"
    edit(_manifest()).to_csv(path, index=False)
    with pytest.raises(Tile2AudioError, match=pattern):
        read_manifest(path)


def test_read_manifest_missing_or_empty_file(tmp_path):
    with pytest.raises(Tile2AudioError, match="not found"):
        read_manifest(tmp_path / "none.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(Tile2AudioError, match="empty"):
        read_manifest(tmp_path / "empty.csv")


def test_resolve_paths_needs_a_root():
    df = validate_manifest(_manifest().assign(root=["/d", "", "/d"]))
    with pytest.raises(Tile2AudioError, match="empty 'root'"):
        resolve_paths(df)
    assert resolve_paths(df, root="/other")[1] == Path("/other/x/b.wav")


# ----------------------------------------------------------------------------- real data

@pytest.mark.skipif(not (SHARED / "urbansound_f12" / "labels.csv").is_file(), reason="urbansound_f12 not available")
def test_real_urbansound_f12_csv(tmp_path):
    df = build_manifest("csv", SHARED / "urbansound_f12" / "labels.csv", label_column="class",
                        fold_column="fold", group_column="source_id")
    _schema_ok(df)
    assert len(df) == 1761
    assert set(df["fold"]) == {1, 2}
    assert df["label"].nunique() == 10
    assert (df["group"] != "").all()
    again = read_manifest(write_manifest(df, tmp_path / "us.csv"))
    assert again["clip_id"].tolist() == df["clip_id"].tolist()
    assert again["fold"].tolist() == df["fold"].tolist()


@pytest.mark.skipif(not (SHARED / "emotify30").is_dir(), reason="emotify30 not available")
def test_real_emotify30_folder():
    df = build_manifest("folder", SHARED / "emotify30")
    _schema_ok(df)
    assert len(df) == 400
    assert df["label"].nunique() == 4
    assert not df["path"].str.endswith(".csv").any()


def test_text_column_and_group_or_self():
    from tile2audio.datasets.schema import OWN_GROUP_PREFIX, group_or_self, text_column

    t = pd.DataFrame({"clip_id": ["a", "b", "c"], "group": [" g ", None, ""]})
    assert list(text_column(t, "group")) == [" g ", "", ""]
    assert list(text_column(t, "group", strip=True)) == ["g", "", ""]
    assert list(text_column(t, "label")) == ["", "", ""]
    groups = group_or_self(text_column(t, "group", strip=True), t["clip_id"])
    assert list(groups) == ["g", OWN_GROUP_PREFIX + "b", OWN_GROUP_PREFIX + "c"]
    assert list(group_or_self(["x", ""], ["a", "x"], prefix="")) == ["x", "x"]


def test_merge_manifests_prefixes_ids_and_groups_keeps_roots(tmp_path, write_audio, tone_fn):
    from tile2audio.cli import main as cli_main
    from tile2audio.datasets import merge_manifests, read_manifest, resolve_paths

    for name in ("music", "speech"):
        for label in ("a", "b"):
            write_audio(tmp_path / name / label / "x.wav", tone_fn(0.2))
        write_manifest(build_manifest("folder", tmp_path / name), tmp_path / f"{name}.csv")
    speech = read_manifest(tmp_path / "speech.csv")
    speech.loc[:, "group"] = ["spk1", "spk1"]
    merged = merge_manifests({"music": tmp_path / "music.csv", "sp": speech})
    assert list(merged["clip_id"]) == ["music/a/x", "music/b/x", "sp/a/x", "sp/b/x"]
    assert list(merged["group"]) == ["", "", "sp/spk1", "sp/spk1"] and list(merged["source"]) == ["music"] * 2 + ["sp"] * 2
    assert [p.parent.parent.name for p in resolve_paths(merged)] == ["music", "music", "speech", "speech"]
    assert all(p.is_file() for p in resolve_paths(merged))
    with pytest.raises(Tile2AudioError, match="no '/'"):
        merge_manifests({"a/b": speech})
    assert cli_main(["merge", str(tmp_path / "music.csv"), f"sp={tmp_path / 'speech.csv'}",
                     "-o", str(tmp_path / "all.csv")]) == 0
    assert len(read_manifest(tmp_path / "all.csv")) == 4
    assert cli_main(["merge", str(tmp_path / "music.csv"), str(tmp_path / "music.csv"), "-o", str(tmp_path / "x.csv")]) == 2
