"""din_fast.ctr: the CTR application built on the attention library.

Reading interaction and labeled-impression logs (loaders, data,
labeled_loader, labeled_samples; rare_ids, the shared row of rare ids), the
DIN and BaseModel models (models), the recipe search (tune),
training and evaluation (config, training, metrics, run_log, the TorchRec
trainer in sharded), checkpoints (checkpoint, foreign_data), scoring
(predict), export to AOTInductor and ONNX (export, onnx_export,
package_inputs) and serving the exports (serving), the ``din-fast`` command
(cli) and its plots (plot); files holds the atomic, input-safe writes every
command uses. It imports the library (din_fast); the library never imports it.
"""
