"""The training run around the step: the data feed (``data_feed``, ``device_data``: views
drawn in the step), the loop and its NaN policy (``train_loop``), preemption, the kNN monitor
(``knn_monitor``), a warm start from a model file (``warm_start``), progress lines
(``progress``) and the run's summary (``run_summary``).

May import: method, eval, bags, input_pipeline, data, store.
"""
