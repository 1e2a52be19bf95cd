"""Bags of similar images: the feature pass (``features``), kNN search (``knn_backends``), bag
files (``bag_file``), the bag report (``bag_report``) and bags recomputed from the student
(``student_bags``).

May import: input_pipeline, data, store.
"""
