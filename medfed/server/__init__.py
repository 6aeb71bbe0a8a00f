"""Server side: the ServerApp (:mod:`medfed.server.server_app`), what it records each round
(:mod:`medfed.server.recording`), resume (:mod:`medfed.server.resume`), checkpoints
(:mod:`medfed.server.checkpoint`) and the report (:mod:`medfed.server.report`).

Nothing is imported here: checkpoints and reports can be read without Flower or torch.
"""
