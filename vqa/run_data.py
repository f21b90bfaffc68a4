"""A training run's data: the training and validation splits read and checked in every process, the images'
decoding shared out among them, and the synthetic set generated first where the config asks for it.
"""
from __future__ import annotations

from pathlib import Path

from . import distributed
from .config import DataConfig, RunConfig
from .data import CSVData, bad_images, read_split
from .errors import VQAError

__all__ = ["prepare_data", "generates_synthetic", "check_synthetic_paths", "shared_bad_images"]


def check_synthetic_paths(train_csv: Path, val_csv: Path) -> None:
    """With ``synthetic`` on and ``train_csv`` missing, the generator writes DIR/train.csv, DIR/val.csv and
    DIR/images/: refuses unless those are the configured paths and no val.csv would be overwritten. A
    mistyped path to one's own data would otherwise fill its folder with shapes, over its files."""
    how = "point train_csv and val_csv at DIR/train.csv and DIR/val.csv of an empty DIR, or set --synthetic false"
    if train_csv.name != "train.csv" or val_csv != train_csv.parent / "val.csv":
        raise VQAError(f"config key 'synthetic' is on and train_csv '{train_csv}' does not exist, but the "
                       f"synthetic data set can only be written as DIR/train.csv and DIR/val.csv; {how}")
    if train_csv.exists():  # not a file (a folder): the CSV could not be written there
        raise VQAError(f"config key 'synthetic' is on and train_csv '{train_csv}' is not a file (a folder?), so the "
                       f"synthetic data set cannot be written there; check the train_csv path, or {how}")
    if val_csv.exists():
        raise VQAError(f"config key 'synthetic' is on and '{train_csv}' does not exist, but '{val_csv}' does: "
                       f"generating the data set would overwrite it; check the train_csv path, or {how}")


def generates_synthetic(cfg: RunConfig) -> bool:
    """Whether the run makes its synthetic data set (both CSVs and the images): it is on, and train_csv missing."""
    return cfg.data.synthetic and not Path(cfg.data.train_csv).is_file()


def shared_bad_images(images: list[Path], procs: distributed.Processes) -> dict[Path, str]:
    """``bad_images`` with the decoding shared out: each process decodes every N-th image, and every process gets
    every bad one (so all stop with the same error, or skip the same rows)."""
    found = bad_images(images[procs.rank::procs.world_size])
    return {image: error for share in distributed.gather(found, procs) for image, error in share.items()}


def prepare_data(cfg: RunConfig, procs: distributed.Processes, images: int | None = None,
                 saved: RunConfig | None = None):
    """The training and validation data, the synthetic set generated first where it is on and missing.
    A resumed run (its ``saved`` config) generates only the set it trained on: one, of its ``images`` (the
    training images it recorded; ``None``: not known)."""
    d = cfg.data
    generated = generates_synthetic(cfg)  # this process's look: all look before any writes
    if generated:
        check_synthetic_paths(Path(d.train_csv), Path(d.val_csv))  # in every process: all refuse alike
        if saved is not None and not saved.data.synthetic:
            raise VQAError(f"resume would generate a synthetic data set in {Path(d.train_csv).parent}, but the run "
                           f"did not train on one (synthetic is off in its config.yaml); point --train_csv and "
                           f"--val_csv at the data it trained on")
        if images is not None and d.synthetic_train_images != images:
            raise VQAError(f"resume would generate the synthetic data set in {Path(d.train_csv).parent} with "
                           f"{d.synthetic_train_images} training images (synthetic_train_images), but the run "
                           f"trained on {images}; give --synthetic_train_images {images} to generate its data set "
                           f"again (the run's seed draws the same images)")
    # In every process, whatever it found (another writer could make processes disagree): the same barriers.
    distributed.barrier(procs)  # every process has looked for the files before the main one writes them
    if generated and procs.is_main:
        from .synth import generate

        out = Path(d.train_csv).parent
        print(f"generating the synthetic shapes data set in {out} ...")
        generate(out, train_images=d.synthetic_train_images, val_images=d.synthetic_val_images,
                 seed=cfg.train.seed)
    distributed.barrier(procs)  # the other processes read what the main one generated
    options = dict(skip_bad_rows=d.skip_bad_rows, allow_outside_paths=d.allow_outside_paths,
                   find_bad=lambda images: shared_bad_images(images, procs))
    train_data, val_data = read_split(d.train_csv, **options), read_split(d.val_csv, **options)
    if d.synthetic and not generated and saved is None and procs.is_main:
        note_synthetic_size(d, train_data, val_data)
    return train_data, val_data


def note_synthetic_size(d: DataConfig, train_data: CSVData, val_data: CSVData) -> None:
    """A synthetic set found in the folder (made before, by a smaller trial run, say) is used as it is: another
    number of images than the config's is said, lest the run pass for another. Not where rows were skipped: a
    skipped row's image may be missing from the count."""
    found = {key: len({row.image for row in data.rows}) for key, data in
             (("synthetic_train_images", train_data), ("synthetic_val_images", val_data))}
    other = [f"{key} ({getattr(d, key)})" for key, n in found.items() if n != getattr(d, key)]
    if other and not (train_data.skipped or val_data.skipped):
        train_images, val_images = found.values()
        print(f"note: training on the data set already in {Path(d.train_csv).parent} ({train_images} training, "
              f"{val_images} validation images); {' and '.join(other)} appl{'ies' if len(other) == 1 else 'y'} "
              f"only to a set generated where none is")
