"""Evaluation on Google Scanned Objects, the protocol GECO's Table 1 uses (PAPER.md "Evaluation").

One idea per module:

    protocol.py       the views (input, 6 Zero123++ poses, 15-view orbit, 16 geometry cameras) and
                      scoring one object's Gaussians against its ground-truth renders
    image_metrics.py  PSNR, SSIM (geco/metrics.py) and LPIPS AlexNet ("unavailable", never a stand-in)
    geometry.py       SyncDreamer's eval_mesh.py protocol: points from depth maps, CD, vIoU, F-score;
                      how Gaussians become depth and occupancy
    models.py         the models under test (teacher K steps / 1 step + reconstructor, GECO generators)
    leakage.py        evaluation objects vs the training manifest (content hash and name)
    results.py        the results folder the report is made from (CONTRACTS.md)

The stage that runs it with Ray (ground truth rendered by the Blender actors, the models under test in
an actor) is pipelines/evaluate.py; the report page is geco/eval/report.py.
"""
