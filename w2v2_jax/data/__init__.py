"""Speech data: files -> fixed-shape numpy batches (no JAX here).

audio.py     decode + validate one utterance (load_audio, AudioError)
manifest.py  fairseq manifests (write_manifest, read_manifest, Manifest)
source.py    random-access utterances (Source protocol, ManifestSource)
tfds_source.py  tensorflow-datasets LibriSpeech as a Source (optional 'tfds' extra)
batching.py  the global batch plan, identical on every host (make_plan, host_rows)
pipeline.py  the Grain pipeline and its checkpointable iterator (make_iterator)
text.py      letter vocabulary (fairseq dict.ltr.txt / HF vocab.json), normalisation, label batches
"""
