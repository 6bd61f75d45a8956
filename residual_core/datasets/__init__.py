"""Datasets of the ResiDual grid: class names, prompts, local loading and the train/val/test splits.

Every dataset is read from a local *data root* (``data_root`` argument, else
``$RESIDUAL_DATA_ROOT/datasets``, else ``./data/datasets``). Nothing is ever downloaded unless
``download=True`` is passed (``residual extract --download``, grid ``extract.download``), and
then only through torchvision's own downloaders, for the datasets they can download (not
stanford_cars, resisc45, imagenet, ``imagefolder:`` or ``hf-dataset:``). Expected layout
under the data root (torchvision's conventions wherever a torchvision class exists):

============== ================================================================================
cifar10        ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``
cifar100       ``cifar-100-python/{train, test, meta}``
mnist          ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
svhn           ``svhn/{train,test}_32x32.mat``
gtsrb          ``gtsrb/GTSRB/Training/<class>/*.ppm``, ``gtsrb/GTSRB/Final_Test/Images/*.ppm``,
               ``gtsrb/GT-final_test.csv``
dtd            ``dtd/dtd/images/<class>/*.jpg``, ``dtd/dtd/labels/{train,val,test}1.txt``
               (the split lists of partition 1)
eurosat        ``eurosat/2750/<ClassFolder>/*.jpg``
stanford_cars  ``stanford_cars/{cars_train/, cars_test/, devkit/, cars_test_annos_withlabels.mat}``
sun397         ``SUN397/{ClassName.txt, <letter>/<class>[/<sub>]/sun_*.jpg}`` (classes mapped to
               the prompt names by name: ``/a/apartment_building/outdoor`` is "apartment
               building outdoor")
resisc45       ``resisc45/NWPU-RESISC45/<class>/*.jpg`` (or ``resisc45/<class>/*.jpg``), optional
               split lists ``resisc45/resisc45-{train,val,test}.txt`` (one image file name a line)
imagenet       ``imagenet/{meta.bin, train/<wnid>/*.JPEG, val/<wnid>/*.JPEG}``, or the ILSVRC2012
               archives in ``imagenet/`` (torchvision extracts them on first use)
============== ================================================================================

Splits (METHOD §4), all stratified with seed 42 and deterministic across runs and processes:

- cifar10, cifar100, mnist, gtsrb: ``val`` = 10% of the official train split, ``train`` = the rest,
  ``test`` = the official test split. svhn, stanford_cars: the same with 20%.
- dtd (the ResiDual authors' protocol): ``val`` = a stratified 20% of partition 1's train + val
  lists together, ``train`` = the rest of that pool, ``test`` = partition 1's test list.
- eurosat, sun397 (no official split): ``test`` = 10% of the whole set, ``val`` = another 10%,
  ``train`` = the remaining 80%.
- resisc45: the standard split lists when all three are present, else 80/10/10 as above.
- imagenet: ``train`` = 80% of the official train split (the bases' fitting set), ``val`` = the
  other 20%, ``test`` = the official validation split.
- ``imagefolder:PATH``: ``PATH/train`` + ``PATH/test`` (+ ``PATH/val`` if present, else 10% of
  train) when ``PATH`` has ``train/`` and ``test/``, else 80/10/10 of ``PATH/<class>/*``; an
  optional ``PATH/dataset.json`` sets the fractions, the seed, the prompt names and templates
  (:class:`.imagefolder.FolderOptions`). Every
  image of the folders a split is drawn from is decoded once first: a file PIL cannot decode
  is an error naming it, or with ``skip_bad_images`` is left out before the split is drawn
  (:attr:`SplitDataset.skipped`), so that the split never depends on when a file failed.
- ``hf-dataset:SOURCE`` (:mod:`.hf`; ``SOURCE`` a ``save_to_disk`` folder or a Hub id read from
  the local ``datasets`` cache, offline): the dataset's own ``train`` and ``test`` (and
  ``validation`` or ``val`` if present, else a carve of train: the fraction of the paper
  dataset the source is named like, :data:`.paper.VAL_FRACTIONS`, else 10%); a dataset with a
  single split is drawn 80/10/10. Columns: the only ``Image`` and ``ClassLabel`` ones, or ``?image=COL&label=COL``.

Labels are indices into :attr:`DatasetInfo.classnames`, the prompt-file order (EuroSAT, RESISC45,
DTD and SUN397 classes are mapped to it by name). :attr:`SplitDataset.indices` are positions in
the source dataset of that official part (official train for ``train``/``val``, official test
for ``test``; the whole set where there is no official split; DTD's train1 then val1 lists):
the stable sample ids that feature stores keep (``hf-dataset:``: row positions within its
source split).

Trust: CIFAR batches are Python pickles, unpickled as torchvision does (``pickle.load``), and
unpickling can run code, so read only dataset folders you trust (downloaded through
torchvision, which checks their md5, or from a source you trust).

Modules: :mod:`.base` (what a dataset is), :mod:`.splits`, :mod:`.paper` (the paper's layouts),
:mod:`.imagefolder`, :mod:`.hf` (Hugging Face datasets), :mod:`.world` (the embedded world's
tasks), :mod:`.registry` (the entry points re-exported here). Importing the package registers
the paper's datasets and the world's.
"""

from residual_core.datasets import world as _world  # noqa: F401  (registers world/*)
from residual_core.datasets.base import (
                                         DEFAULT_TEMPLATES,
                                         SEED,
                                         DatasetInfo,
                                         Factory,
                                         FileListSource,
                                         SplitDataset,
                                         SplitSource,
                                         validate_labels,
)
from residual_core.datasets.paper import PAPER_DATASETS, CifarSource, SvhnSource
from residual_core.datasets.registry import (
                                         dataset_info,
                                         list_datasets,
                                         load_dataset,
                                         register_dataset,
)
from residual_core.datasets.splits import split_80_10_10, stratified_split
from residual_core.identity import HF_DATASET_PREFIX, IMAGEFOLDER_PREFIX
from residual_core.layout import SPLITS

__all__ = ['DEFAULT_TEMPLATES', 'HF_DATASET_PREFIX', 'IMAGEFOLDER_PREFIX', 'PAPER_DATASETS', 'SEED', 'SPLITS', 'CifarSource', 'DatasetInfo', 'Factory', 'FileListSource', 'SplitDataset', 'SplitSource', 'SvhnSource', 'dataset_info', 'list_datasets', 'load_dataset', 'register_dataset', 'split_80_10_10', 'stratified_split', 'validate_labels']
