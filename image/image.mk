# The appliance image (issue 5): included by the root Makefile (`include image/image.mk`).
#
#   make image [ARCH=x86_64|aarch64] [IMAGE_TARGET=x86_64-metal]   raw, qcow2, vmdk, vhdx + SHA-256 + manifest
#   make bundle [ARCH=...]                                          signed RAUC bundle of the last image
#   make test-image                                                 boot tests, x86_64 (tests/image/run.py)
#   make test-image-arm                                             aarch64: build once, boot once
#
# Outputs go to image/out/<arch>/ for an architecture's default target (x86_64-vm, aarch64-metal), and to
# image/out/<target>/ for the others. The root tree is cached in /var/cache/m365-sensor-image (image/build.sh).
ARCH ?= x86_64
IMAGE_TARGET_x86_64 := x86_64-vm
IMAGE_TARGET_aarch64 := aarch64-metal
IMAGE_TARGET ?= $(IMAGE_TARGET_$(ARCH))
IMAGE_OUT ?= image/out/$(if $(filter $(IMAGE_TARGET),$(IMAGE_TARGET_$(ARCH))),$(ARCH),$(IMAGE_TARGET))
# Scenarios of tests/image/run.py for `make test-image` (all of them: add powerloss; it adds ~6 min).
IMAGE_TESTS ?= helper,flash,seed-boot,verity,bundle,update,rollback

.PHONY: image bundle test-image test-image-arm image-deps

## Host packages of the image pipeline and its tests (idempotent; mounts binfmt_misc when missing).
image-deps:
	image/host-deps.sh

## The appliance image of $(ARCH) (static agent from `make dist`).
image: image-deps dist
	image/build.sh $(IMAGE_TARGET) $(IMAGE_OUT)

## A signed RAUC bundle of the image last built for $(ARCH) (test key unless RAUC_KEYS_DIR is set).
bundle:
	image/bundle.sh $(IMAGE_OUT)

## Boot tests of the x86_64 image under QEMU (TCG): seed, running agent, verity fail-closed, bundles, rollback.
test-image:
	$(MAKE) image ARCH=x86_64
	tests/image/run.py --arch x86_64 --out image/out/x86_64 --only $(IMAGE_TESTS)

## aarch64: builds the image once (mmdebstrap under qemu-user: slow) and boots it once.
test-image-arm:
	$(MAKE) image ARCH=aarch64
	tests/image/run.py --arch aarch64 --out image/out/aarch64 --only seed-boot
