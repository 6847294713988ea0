"""The dataset: from files under `dataset.uri` to uint8 image batches on each worker.

listing.py        what is under the root (local or S3), which files are images, their fingerprint
layouts/          one module per `dataset.layout`: listed files -> (key, label, split) rows
split.py          the stable hash split for images the layout does not place
index.py          DatasetIndex (built and checked on the driver) and the KeyTables workers get
order.py          which rows each worker reads, in which order, every epoch
readers/          how a batch's image bytes are fetched (one module per storage format)
pipeline.py       the Ray Data pipeline: fetch with the reader, decode, resize/crop to uint8
preprocessing.py  the resize/crop/normalise numbers and their transforms
demo_data.py      the digits images of `tlray demo`
"""
