"""Server side: the ServerApp (:mod:`medfed.server.server_app`), what it records each round
(:mod:`medfed.server.recording`), resume (:mod:`medfed.server.resume`), checkpoints
(:mod:`medfed.server.checkpoint`), the metrics log (:mod:`medfed.server.metrics_log`), the report
(:mod:`medfed.server.report`) and the names of a run folder's files (:mod:`medfed.server.run_files`).

Nothing is imported here: checkpoints and reports can be read without Flower or torch.
"""
