#!/bin/sh
# Enables the apt components that hold MBROLA's English voices and festival's rab voice (Debian: contrib
# and non-free; Ubuntu: universe and multiverse) in one file of our own, when apt does not know the
# packages yet. Run as root (or with passwordless sudo) by `make corpus-deps`; does nothing when the
# packages are already known or the file exists.
#
# apt refuses two entries for the same archive and suite with different Signed-By values (none counts as
# a value), so the entry is written without Signed-By and, if apt cannot read its sources then, with the
# distribution's archive keyring, as Debian's own images write theirs.
set -e
FILE=/etc/apt/sources.list.d/w2v2-jax-voices.list
[ -e "$FILE" ] && exit 0
apt-cache show mbrola-us1 >/dev/null 2>&1 && exit 0
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
. /etc/os-release
case "$ID" in
  debian) uri=http://deb.debian.org/debian; components="contrib non-free"
          keyring=/usr/share/keyrings/debian-archive-keyring.gpg;;
  ubuntu) uri=http://archive.ubuntu.com/ubuntu; components="universe multiverse"
          keyring=/usr/share/keyrings/ubuntu-archive-keyring.gpg;;
  *) echo "apt_voice_sources: $ID is neither Debian nor Ubuntu: enable the components that hold mbrola-us1 and festvox-rablpc16k yourself" >&2
     exit 1;;
esac
for options in "" "[signed-by=$keyring] "; do
  echo "deb $options$uri $VERSION_CODENAME $components" | $SUDO tee "$FILE" >/dev/null
  if apt-cache policy >/dev/null 2>&1; then
    echo "apt_voice_sources: enabled '$components' of $uri $VERSION_CODENAME in $FILE"
    exit 0
  fi
done
$SUDO rm -f "$FILE"
echo "apt_voice_sources: apt could not read its sources with $components of $uri added; enable them yourself" >&2
exit 1
