"""Data on s3://, against a real S3 API server on loopback (moto's server, in memory).

The same path layer as gs:// (storage.py: fsspec, here s3fs), reached through `FSSPEC_S3_ENDPOINT_URL`:
`w2v2 manifest` on the bucket's audio, `pack` into the bucket, `finetune` on the packed shards (which
come through the local shard cache: ArrayRecord reads gs:// and local files only) validating on the
bucket's manifest, `evaluate` of the bucket's audio into the bucket. The run directory is local:
Orbax writes checkpoints to local paths and gs:// only (test_checkpoint tests that an s3:// run
directory is refused). The test's own client is boto3, independent of the library's layer.
"""
import io
import os
import subprocess
import sys

import pytest
import soundfile as sf

from test_object_storage import note_clips

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

CLI = [sys.executable, "-m", "w2v2_jax.cli"]
BUCKET = "w2v2-test"


@pytest.fixture(scope="module")
def s3():
  server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  server.start()
  host, port = server.get_host_and_port()
  url = f"http://{host}:{port}"
  creds = dict(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
  client = boto3.client("s3", endpoint_url=url, **creds)
  client.create_bucket(Bucket=BUCKET)
  try:
    yield url, client
  finally:
    server.stop()


def run(args, env, cwd, timeout=600):
  proc = subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  return proc


def test_data_on_s3(s3, tmp_path):
  url, client = s3
  env = dict(os.environ, FSSPEC_S3_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
             AWS_DEFAULT_REGION="us-east-1", JAX_PLATFORMS="cpu", W2V2_PACKED_CACHE=str(tmp_path / "cache"))
  env.pop("XLA_FLAGS", None)
  gs = lambda name: f"s3://{BUCKET}/{name}"  # noqa: E731
  get = lambda name: client.get_object(Bucket=BUCKET, Key=name)["Body"].read()  # noqa: E731
  clips = note_clips(count=16, seed=7)
  for name, (data, _) in clips.items():
    client.put_object(Bucket=BUCKET, Key=f"audio/{name}", Body=data)

  run(["manifest", f"--root={gs('audio')}", f"--out={gs('manifests')}", "--valid_percent=0.25"], env, tmp_path)
  splits = {}
  for split in ("train", "valid"):
    lines = get(f"manifests/{split}.tsv").decode().splitlines()
    assert lines[0] == gs("audio")
    splits[split] = [line.split("\t") for line in lines[1:]]
    client.put_object(Bucket=BUCKET, Key=f"manifests/{split}.ltr",
                      Body="".join(" ".join(f"{w} |" for w in clips[n][1]) + "\n" for n, _ in splits[split]).encode())
  assert sorted(n for s in splits.values() for n, _ in s) == sorted(clips)
  assert all(int(size) == sf.info(io.BytesIO(clips[n][0])).frames for n, size in splits["train"])

  run(["pack", gs("manifests/train.tsv"), gs("packed/train"), "--shards=2"], env, tmp_path)
  keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="packed/")["Contents"])
  assert keys == ["packed/train-00000-of-00002.array_record", "packed/train-00001-of-00002.array_record",
                  "packed/train.packed.json", "packed/train.sizes.npy"]

  run_dir = str(tmp_path / "ft")
  run(["finetune", "--config=finetune:tiny", f"--workdir={run_dir}",
       f"--config.data.train_manifest={gs('packed/train.packed.json')}",
       f"--config.data.valid_manifest={gs('manifests/valid.tsv')}", "--config.data.label=ltr",
       "--config.train.steps=2", "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
       "--config.train.freeze_updates=0", "--config.train.log_every=1"], env, tmp_path)
  assert os.path.isfile(os.path.join(run_dir, "export", "model.safetensors"))
  cached = sorted(name.split("-", 1)[1] for name in os.listdir(tmp_path / "cache"))
  assert cached == ["train-00000-of-00002.array_record", "train-00001-of-00002.array_record"]

  out = run(["evaluate", f"--checkpoint={run_dir}", f"--data={gs('manifests/valid.tsv')}", "--label=ltr",
             f"--out={gs('eval/hyp.tsv')}"], env, tmp_path).stdout
  assert "WER" in out.upper() and len(get("eval/hyp.tsv").decode().splitlines()) == 1 + len(splits["valid"])
