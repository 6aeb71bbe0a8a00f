"""Client side: the ClientApp (:mod:`medfed.client.client_app`), the site's data lookup
(:mod:`medfed.client.site_data`) and the local train/evaluate loops (:mod:`medfed.client.task`).

Nothing is imported here, so that ``medfed.client.task`` can be used without Flower.
"""
