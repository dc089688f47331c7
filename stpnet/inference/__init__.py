"""Prediction: loading a checkpoint (`checkpoint_loading`), the predictor (`predict`), the files it writes
(`prediction_files`) and the `stpnet-predict` command line (`cli`)."""
