"""The paper's experiments: the `worm` command (cli), the CNN and text comparisons of
EB Train and WORM (experiments, experiments_text), the offline datasets (data, text) and
the models used only by them (models).

Kept apart from the core so that ``import worm`` (WormSGD, EarlyBird, tickets, ops)
needs neither matplotlib nor scikit-learn nor torchvision; those come with the
``[paper]`` extra.
"""
