#!/usr/bin/env bash
# README's and docs/*.md's flows top to bottom on bundled real cells (tests/docs/test_readme_flows.py runs it and
# checks that every embedcache/probes command line of the bash blocks of README.md and docs/*.md has a counterpart
# here: the same command with every flag it uses, where a flag that cannot run here is recorded in a
# '# skipped: <command> <flags> (why)' line).
# Substitutions: uni / dinobloom-b / dinov2-l -> timm:test_vit / timm:test_resnet with --weights random at
# 32 px; cells/ -> a bundled BCCD ImageFolder; manifest.csv -> 104 bundled Chula cells.
# skipped: embedcache extract --model uni --weights ~/ckpt/uni.safetensors --out s3://  (no object store offline)
# skipped: embedcache extract --model timm:vit_small_patch14_dinov2 --data bloodmnist.npz  (hub weights; .npz is in tests/embedcache/inputs/test_sources.py)
# skipped: probes finetune --hierarchy --loss hierarchical-focal  (hierarchy files: tests/probes/tuning/test_losses.py)
# skipped: embedcache extract --data s3:// --out s3:// --scheduler  (an object store and a running Dask scheduler: tests/embedcache/store/test_s3.py, tests/embedcache/extraction/test_distributed.py)
set -euo pipefail
DATA=${1:?usage: readme_flows.sh TESTS_DATA_DIR WORKDIR}
cd "${2:?}"
W="--weights random --input-size 32"
python - "$DATA" <<'PY'
import sys, pandas as pd
from pathlib import Path
root = Path(sys.argv[1]) / "chula_rbc12"
df = pd.read_csv(root / "manifest.csv", dtype=str).groupby("label").head(8).reset_index(drop=True)
df["path"] = [str(root / p) for p in df["path"]]
df["split"] = ["test" if i % 8 in (0, 1) else "train" for i in range(len(df))]  # test cells in both domains
df["group"] = df["smear"]
df["domain"] = ["siteA" if i % 2 else "siteB" for i in range(len(df))]
df[["path", "label", "split", "group", "domain"]].to_csv("manifest.csv", index=False)
import embedcache  # ids as the store will have them (below the paths' common folder)
ids = embedcache.open_source("manifest.csv").table["id"]
pd.DataFrame({"id": ids, "new_label": df["label"].iloc[::-1].to_numpy()}).head(2).to_csv("reviewed.csv", index=False)
PY

embedcache models
embedcache extract --model timm:test_vit $W --data "$DATA/bccd_wbc" --out folder.zarr -q
embedcache extract --model timm:test_vit $W --data manifest.csv --out cache.zarr --pool cls,mean -q
embedcache extract --model timm:test_resnet $W --data manifest.csv --out cache.zarr -q
embedcache extract --model timm:test_vit $W --data manifest.csv --out cache.zarr --working-size 40 \
    --perturb blur-pre:0.4,0.8 --perturb blur-post:0.4,0.8 -q
embedcache info cache.zarr
embedcache verify cache.zarr
embedcache verify cache.zarr --repair
embedcache info cache.zarr --verify
embedcache info cache.zarr --json > info.json
embedcache export cache.zarr --anndata cells.h5ad
python -c "import anndata; a = anndata.read_h5ad('cells.h5ad'); assert a.n_obs == 104 and len(a.obsm) >= 3, a"
python -c "import embedcache, numpy as np; ds = embedcache.open_store('cache.zarr').dataset(); \
np.save('feats.npy', ds.find_feature_set('timm:test_resnet').to_numpy('mean')); ds.obs[['id']].to_csv('cells.csv', index=False)"
embedcache import --features feats.npy --cells cells.csv --model theirs --out cache.zarr

RES="timm-test_vit@random/32-bicubic"  # two clean test_vit sets now (32 px and working size 40): select one
probes scale --store cache.zarr --seeds 1 --model $RES --limits 2..4 --probes logistic,knn,svm --split column --out scale1 -q
probes scale --store cache.zarr --seeds 1 --model $RES,timm:test_resnet,theirs --limits 2..4 --split group --out scale2 -q
probes eval --store cache.zarr --model $RES --probe logistic --split column --out eval1 -q
probes scale --store cache.zarr --seeds 1 --model $RES --limits 2..4 --train-domain siteA --test-domain siteB --split column --out domains -q
probes robustness --store cache.zarr --model timm-test_vit@random/32-bicubic-ws40,timm:test_resnet --perturb blur-pre,blur-post \
    --probe logistic --out robust 2>&1 | tee robust.log || grep -q "no 'blur-pre' feature sets beside 'timm-test_resnet" robust.log
probes robustness --store cache.zarr --model timm-test_vit@random/32-bicubic-ws40 --perturb blur-pre,blur-post --probe logistic --out robust -q

embedcache extract --model timm:test_vit $W --data manifest.csv --out cache.zarr --tail-blocks 1 -q
probes scale --store cache.zarr --seeds 1 --model $RES --limits 4 --probes logistic,lp,ft-last --tail-blocks 1 --epochs 2 --split column --out ft -q
probes scale --store cache.zarr --seeds 1 --model $RES --probes lora --tail-blocks 1 --lora-rank 2 --limits 4 --epochs 1 --split column --out lora -q
probes finetune --store cache.zarr --model $RES --method lora --blocks all --augment flip,rot90 --epochs 1 \
    --split column --out runs/lora-all -q
probes eval --store cache.zarr --model $RES --probes ft-last --tail-blocks 1 --epochs 1 --split column \
    --save-adapter runs/ftlast --out evalft -q
embedcache extract --model timm:test_vit $W --adapter runs/ftlast --data manifest.csv --out cache.zarr -q

probes ensemble --store cache.zarr --seeds 1 --model $RES --heads knn,logistic,cosine --primary logistic --pairs auto --split column --out ens -q
probes calibrate --store cache.zarr --model $RES --probe logistic --split column --out cal -q
probes selective --store cache.zarr --model $RES --probe logistic --target-accuracy 0.5 --confidence msp,margin \
    --split column --out sel -q
probes audit --store cache.zarr --model $RES,timm:test_resnet --probes logistic,knn --folds 2 --seeds 1 --out audit -q --map
grep -q "<iframe class=map" audit/report.html  # --map: the Map tab is in the report
probes audit --store cache.zarr --model $RES --probes logistic,knn --folds 2 --seeds 1 --out-of-core always --out audit-ooc -q
embedcache extract --model timm:test_vit $W --data manifest.csv --out dist.zarr --cluster local:2 -q
probes scale --store dist.zarr --seeds 1 --model timm:test_vit --limits 4 --probes knn,logistic --split column \
    --scheduler local:2 --out-of-core auto --max-memory 1KB --out sched -q
FIRST=$(python -c "import embedcache; print(embedcache.open_store('cache.zarr').dataset().obs['id'][0])")
IMAGE=$(python -c "import embedcache; print(embedcache.open_store('cache.zarr').dataset().obs['path'][0])")
probes neighbors --store cache.zarr --model $RES --id "$FIRST" -k 3 --out nb
probes neighbors --store cache.zarr --model $RES --image "$IMAGE" -k 3 --out nb2
probes neighbors --store cache.zarr --model $RES --image "$IMAGE" -k 3 --index ivf --nprobe 8 --rerank 50 --recall --out nb3
probes map --store cache.zarr --model $RES --out map --thumbnails 20 -k 3 --perplexity 5 --seed 1
probes map --store cache.zarr --model $RES --suspicion audit/ --thumbnails 40 --out map-audit
probes relabel --store cache.zarr --corrections reviewed.csv
echo "README flows: all ran"
