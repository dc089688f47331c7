"""The STPNet toolkit: data preparation, training, evaluation, prediction, export and visualisation.

The model itself (config, modeling, image processing: what a checkpoint carries) is `modeling_stpnet`; this package
builds on it and `modeling_stpnet` never imports it.
"""
