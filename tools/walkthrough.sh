#!/usr/bin/env bash
# The README walk-through, end to end, as one script (CI runs it on a scaled-down copy of the
# data: tests/test_walkthrough.py). Two trained sources ship inside mdafx (cifar10-vgg,
# cifar10-resnet20), so all it needs is CIFAR-10 as an ImageFolder:
#
#   DATA=/path/to/cifar10 bash tools/walkthrough.sh       # DATA holds train/ and test/
#
# OUT (default ./mdafx-walkthrough) receives every file; PER_CLASS (default 50) is the number of
# confident samples per class that profiling keeps. Nothing here trains.
set -euo pipefail
DATA=$(cd "${DATA:?set DATA to a folder holding train/ and test/ (one folder per class)}" && pwd)
OUT=${OUT:-mdafx-walkthrough}
PER_CLASS=${PER_CLASS:-50}
mkdir -p "$OUT" && cd "$OUT"

# 1. Profile each source on its training images: the PER_CLASS most confident images per class
#    and their per-channel contributions (MDA 1.1-1.2). 10% of every class is held out of
#    profiling and recorded as the calibration split that step 2 scores candidates on.
mdafx analyse --model cifar10-vgg --data "$DATA/train" --per-class "$PER_CLASS" -o vgg.profile
mdafx analyse --model cifar10-resnet20 --data "$DATA/train" --per-class "$PER_CLASS" \
    -o resnet20.profile

# 2. Disassemble: a {cat, dog} component of the VGG and an {airplane, ship} component of the
#    ResNet-20. The default recipe searches MDA's thresholds for the best component within 50%
#    of the source's MACs (the largest, unless a smaller one scores significantly higher),
#    chooses which channels stay where one layer reads them (block OBS) and refits each
#    candidate's layers in closed form on the calibration split; the per-class table warns
#    about a class the component never predicts.
mdafx disassemble --model cifar10-vgg --profile vgg.profile --task cat,dog -o vgg-cat-dog.mdafx
mdafx disassemble --model cifar10-resnet20 --profile resnet20.profile --task airplane,ship \
    -o resnet20-airplane-ship.mdafx

# 3. Each component beside its source, on the same test images and the same logits.
mdafx evaluate vgg-cat-dog.mdafx --model cifar10-vgg --data "$DATA/test"
mdafx evaluate resnet20-airplane-ship.mdafx --model cifar10-resnet20 --data "$DATA/test"

# 4. Assemble the two into one 4-class classifier (parallel branches: the architectures differ)
#    with one closed-form head (LDA) over both components' features, fitted on training images
#    of the four classes (never the test split).
mdafx assemble vgg-cat-dog.mdafx resnet20-airplane-ship.mdafx --calibrate "$DATA/train" \
    -o assembled.mdafx
mdafx evaluate assembled.mdafx --data "$DATA/test"

# 5. What the files hold, the per-pass dumps of the assembly (of the logits as they are; with
#    --calibrate "$DATA/train" inspect also fits the head and dumps its pass), and ONNX
#    checked by onnxruntime.
mdafx info assembled.mdafx
mdafx inspect vgg-cat-dog.mdafx resnet20-airplane-ship.mdafx -o dumps
mdafx export assembled.mdafx -o assembled.onnx --latency
mdafx info assembled.onnx
