#!/bin/sh
# /init of the kernel-matrix guests (see xtask/src/vm/). Runs the root integration test
# binaries and prints one verdict line for the host to read:
#   TWTRACE-VM-VERDICT pass|fail kernel=RELEASE preflight=ok scenarios=ok churn=fail
# Kernel command line: twtrace.args=BASE64 (newline-terminated arguments for the test binaries),
# twtrace.suites=a,b (which test binaries, default all), twtrace.shell=1 (a shell instead).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
# This busybox runs its own applets before anything on PATH: the real tools by path.
IP=/usr/sbin/ip

# Stage 1: the initramfs root cannot be made a slave mount for `ip netns exec`, so move
# everything into a tmpfs and switch_root into it.
if [ ! -e /.twtrace-vm-root ]; then
    mount -t tmpfs -o mode=0755 root /newroot || exec sh
    for f in /*; do
        case "$f" in
        /newroot | /proc | /sys) ;;
        *) cp -a "$f" /newroot/ ;;
        esac
    done
    mkdir -p /newroot/proc /newroot/sys
    touch /newroot/.twtrace-vm-root
    exec switch_root /newroot /init
fi

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 run /run
mount -t tmpfs -o mode=1777 tmp /tmp
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --make-rshared /
hostname twtrace-vm
$IP link set lo up
# Modules the tests need (sock_diag for TCP: twtrace's socket lists, ss).
mods="/lib/modules/$(uname -r)/twtrace"
if [ -r "$mods/order" ]; then
    for m in $(cat "$mods/order"); do
        insmod "$mods/$m.ko" || echo "twtrace-vm: insmod $m failed"
    done
fi

args_b64=""
suites="scenarios churn"
shell=""
for word in $(cat /proc/cmdline); do
    case "$word" in
    twtrace.args=*) args_b64="${word#twtrace.args=}" ;;
    twtrace.suites=*) suites="$(echo "${word#twtrace.suites=}" | tr ',' ' ')" ;;
    twtrace.shell=1) shell=1 ;;
    esac
done
set --
if [ -n "$args_b64" ]; then
    echo "$args_b64" | base64 -d >/tmp/.twtrace-args
    while IFS= read -r a || [ -n "$a" ]; do
        set -- "$@" "$a"
    done </tmp/.twtrace-args
fi

kernel="$(uname -r)"
echo "TWTRACE-VM-BOOTED kernel=$kernel uptime=$(cut -d' ' -f1 /proc/uptime) cpus=$(nproc)"

export TWTRACE_BIN=/opt/twtrace/bin/twtrace TWLOAD_BIN=/opt/twtrace/bin/twload CI=true TWTRACE_TESTS_REQUIRED=1
export RUST_BACKTRACE=1
cd /tmp

if [ -n "$shell" ]; then
    echo "twtrace-vm: shell (test binaries in /opt/twtrace/tests; exit to power off)"
    setsid cttyhack sh
    poweroff -f
fi

# What the tests need; without it they would skip (and pass).
preflight=ok
fail() {
    echo "TWTRACE-VM-PREFLIGHT fail: $*"
    preflight=fail
}
[ "$(id -u)" = 0 ] || fail "not root"
[ -r /sys/kernel/btf/vmlinux ] || fail "no /sys/kernel/btf/vmlinux"
$IP -V >/dev/null 2>&1 || fail "ip -V fails"
if $IP netns add twvm-preflight; then
    $IP -n twvm-preflight link set lo up || fail "ip -n NS link set lo up"
    $IP netns exec twvm-preflight sysctl -qw net.ipv4.tcp_fin_timeout=1 ||
        fail "ip netns exec NS sysctl -qw"
    $IP netns del twvm-preflight
else
    fail "ip netns add"
fi
/usr/bin/ss -Htan >/dev/null || fail "ss -tan (sock_diag) fails"
echo "TWTRACE-VM-PREFLIGHT $preflight"

# What twtrace itself makes of this kernel (informational: the tests give the verdict).
if [ "$preflight" = ok ]; then
    check="$("$TWTRACE_BIN" check 2>&1)"
    rc=$?
    printf '%s\n' "$check"
    echo "TWTRACE-VM-CHECK rc=$rc $(printf '%s\n' "$check" | grep -v '^ *$' | tail -n 1)"
    if [ "$rc" != 0 ]; then
        # The end of the verifier's (long) log: its verdict and summary.
        "$TWTRACE_BIN" check -vv 2>&1 | grep -B12 -m1 -E 'processed [0-9]+ insns|too large|too deep' |
            sed 's/^/TWTRACE-VM-CHECK-DETAIL /'
    fi
fi

verdict=pass
results="preflight=$preflight"
[ "$preflight" = ok ] || verdict=fail
for suite in $suites; do
    if [ "$preflight" != ok ]; then
        results="$results $suite=skipped"
        continue
    fi
    echo "TWTRACE-VM-SUITE start $suite"
    "/opt/twtrace/tests/$suite" "$@" 2>&1
    rc=$?
    echo "TWTRACE-VM-SUITE end $suite rc=$rc"
    if [ "$rc" = 0 ]; then
        results="$results $suite=ok"
    else
        results="$results $suite=fail"
        verdict=fail
    fi
done
echo "TWTRACE-VM-VERDICT $verdict kernel=$kernel $results"
sync
poweroff -f
