"""Client side: the ClientApp (:mod:`medfed.client.client_app`), the site's data lookup
(:mod:`medfed.client.site_data`) and the local train/evaluate loops (:mod:`medfed.client.task`).

Nothing is imported here, so that ``medfed.client.task`` can be used without Flower.
"""

#: What a site's log says in the study's last round; ``medfed client`` looks for it, to tell
#: a study that finished from a server that went away.
LAST_ROUND_MARK = "the study's last round"
