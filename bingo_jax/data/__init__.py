"""Images from their sources to device batches: the parts below the input pipeline.

``sources/`` (TFDS, image folders, file lists, Fashion-MNIST, arrays), ``views`` (view names),
``canvases`` (images decoded once), ``augment`` (MoCo v2 views in tf.data, on the host),
``device_augment`` (the same views in jnp, inside the step), ``augment_params``,
``bad_images`` (undecodable images named or replaced), ``images`` (uint8 -> normalised),
``lazy_modules``, ``parallel`` (the mesh and the batch shardings).

May import: nothing else of bingo_jax.
"""
