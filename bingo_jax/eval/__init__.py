"""Evaluation protocols (``python -m bingo_jax.evaluate``).

``knn``: 10-NN majority vote and temperature-weighted 200-NN vote on pooled features.
``linear``: linear probes (the released protocol on augmented images, and a fast probe on
cached centre-crop features). ``finetune``: semi-supervised fine-tuning on a labelled subset
(``subsets``). ``analysis``: bag distance (paper Eq. 11), intra-class distance, t-SNE.

May import: bags, input_pipeline, data, models, store.
"""
