#!/bin/bash
# Runs inside the booted Debian container (tests/test_deb_container.py), as a oneshot
# unit after multi-user.target, under the real systemd as PID 1. /mnt/gk is the test's
# directory: gatekeeper.deb and project/ in, out/ back. Each step writes what it saw to
# out/NAME; the test on the host makes the assertions, so a failure shows the evidence.
# Ends the boot itself (ExecStopPost=poweroff in the unit).
set -u
OUT=/mnt/gk/out
mkdir -p "$OUT"
exec >"$OUT/check.log" 2>&1
set -x

export HOME=/root
mkdir -p /root/.distcc
step() { echo "== $1"; }
# Until something listens on port $1 (a forking init script returns before its daemon
# has bound).
wait_port() {
    for _ in $(seq 100); do
        ss -ltnH "( sport = :$1 )" | grep -q LISTEN && return 0
        sleep 0.1
    done
    return 1
}
ports() { ss -ltnpH "( sport = :3632 or sport = :3633 )" > "$OUT/$1" 2>&1; }

# A plain build with the stock distcc client and no fallback: a job gatekeeper failed
# fails the build instead of quietly compiling locally (and no backoff, so one failed
# step does not bench the host for the next ones).
export DISTCC_BACKOFF_PERIOD=0
build() {  # build NAME
    rm -rf "/root/$1" && cp -a /mnt/gk/project "/root/$1" && cd "/root/$1" || return 1
    DISTCC_HOSTS=127.0.0.1:3632/4 DISTCC_FALLBACK=0 \
        timeout 300 make -j4 objs > "$OUT/$1.make" 2>&1
    echo "$?" > "$OUT/$1.rc"
    for o in src/*.o; do sha256sum "$o"; done > "$OUT/$1.objects"
    cd /
}

# Until the job's compiler runs (so gatekeeper has admitted it and its bytes move),
# and gatekeeper's STATUS= says so.
wait_running() {  # wait_running UNIT
    for _ in $(seq 300); do
        if pgrep -u distccd -x cc1plus >/dev/null &&
           systemctl show -p StatusText --value "$1" | grep -q '^1/'; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# The drain: one job that compiles for seconds (a compiler wrapper that sleeps is not
# allowed by the argv policy, so it is a real compile of a big file); stop while its
# compiler runs: the job finishes, the client sees success, then the unit stops.
drain() {  # drain UNIT NAME
    rm -rf "/root/$2" && mkdir "/root/$2" && cd "/root/$2" || return 1
    cp /mnt/gk/slow.cc .
    (DISTCC_HOSTS=127.0.0.1:3632/1 DISTCC_FALLBACK=0 \
        timeout 300 distcc g++ -O2 -c slow.cc -o slow.o > "$OUT/$2.client" 2>&1; echo $? > "$OUT/$2.rc") &
    client=$!
    if wait_running "$1"; then echo "running-seen" > "$OUT/$2.seen"; else echo "never-running" > "$OUT/$2.seen"; fi
    systemctl stop "$1"
    echo "stop-rc=$?" >> "$OUT/$2.seen"
    wait "$client"
    systemctl is-active "$1" >> "$OUT/$2.seen"
    cd /
}

mode_checks() {  # mode_checks SERVICE PREFIX
    local svc=$1 p=$2
    step "$p: first build"
    build "$p-cold"
    journalctl -o cat -u "$svc" --no-pager > "$OUT/$p.journal-cold" 2>&1
    systemctl status --no-pager "$svc" > "$OUT/$p.status" 2>&1
    step "$p: restart, rebuild"
    systemctl restart "$svc"
    ls -l /var/lib/gatekeeper > "$OUT/$p.state" 2>&1
    build "$p-warm"
    journalctl -o cat -u "$svc" --no-pager > "$OUT/$p.journal" 2>&1
    step "$p: stop drains"
    drain "$svc" "$p-drain"
    journalctl -o cat -u "$svc" --no-pager > "$OUT/$p.journal-after-stop" 2>&1
}

step "stock distccd on the public port"
sed -i 's/^STARTDISTCC=.*/STARTDISTCC="true"/; s/^ALLOWEDNETS=.*/ALLOWEDNETS="127.0.0.1"/; s/^LISTENER=.*/LISTENER="0.0.0.0"/' /etc/default/distcc
# (restart: at boot it ran and did nothing, STARTDISTCC being false then)
systemctl restart distcc
wait_port 3632
{ systemctl status --no-pager distcc; journalctl -o cat -u distcc --no-pager; } > "$OUT/distcc.status" 2>&1
ports before-install.ports

step "install the package"
apt-get install -y /mnt/gk/gatekeeper.deb > "$OUT/install.log" 2>&1
echo "$?" > "$OUT/install.rc"
ports after-install.ports
for u in gatekeeper.socket gatekeeper.service gatekeeper-distccd.service \
         gatekeeper-inetd.socket gatekeeper-inetd.service; do
    echo "$u $(systemctl is-enabled "$u" 2>&1) $(systemctl is-active "$u" 2>&1)"
done > "$OUT/after-install.units"
command -v gatekeeper > "$OUT/which"
/usr/bin/python3 -c 'import trio, sys; print(trio.__version__, sys.executable)' >> "$OUT/which"

step "limits from /etc/default/gatekeeper"
sed -i 's/^MAX_JOBS=.*/MAX_JOBS=2/; s/^MIN_FREE_MB=.*/MIN_FREE_MB=64/' /etc/default/gatekeeper

step "switch over: proxy mode"
# Two commands: `disable --now` on Debian's SysV distcc only disables (the redirect to
# systemd-sysv-install skips the stop), and distccd would keep port 3632.
systemctl stop distcc
systemctl disable distcc
systemctl enable --now gatekeeper.socket gatekeeper.service
ports proxy.ports
ps -eo user,args | grep -E '[g]atekeeper|[d]istccd' > "$OUT/proxy.ps"
mode_checks gatekeeper.service proxy

step "upgrade keeps the socket, distccd, the running job and what was learned"
systemctl start gatekeeper.service
systemctl show -p MainPID --value gatekeeper.service > "$OUT/upgrade.before"
systemctl show -p NRefused,NConnections,ActiveEnterTimestampMonotonic --value gatekeeper.socket >> "$OUT/upgrade.before"
systemctl show -p MainPID --value gatekeeper-distccd.service > "$OUT/upgrade.distccd-before"
rm -rf /root/upgrade-job && mkdir /root/upgrade-job && cp /mnt/gk/slow.cc /root/upgrade-job/
(cd /root/upgrade-job && DISTCC_HOSTS=127.0.0.1:3632/1 DISTCC_FALLBACK=0 \
    timeout 300 distcc g++ -O2 -c slow.cc -o slow.o > "$OUT/upgrade-job.client" 2>&1
 echo $? > "$OUT/upgrade-job.rc") &
job=$!
if wait_running gatekeeper.service; then echo running-seen; else echo never-running; fi > "$OUT/upgrade-job.seen"
dpkg -i /mnt/gk/gatekeeper.deb > "$OUT/upgrade.log" 2>&1
echo "$?" > "$OUT/upgrade.rc"
wait "$job"
systemctl show -p MainPID --value gatekeeper-distccd.service > "$OUT/upgrade.distccd-after"
systemctl show -p MainPID --value gatekeeper.service > "$OUT/upgrade.after"
systemctl show -p NRefused,NConnections,ActiveEnterTimestampMonotonic --value gatekeeper.socket >> "$OUT/upgrade.after"
ls -l /var/lib/gatekeeper >> "$OUT/upgrade.after" 2>&1
grep -c . /etc/default/gatekeeper > /dev/null && grep '^MAX_JOBS' /etc/default/gatekeeper >> "$OUT/upgrade.after"

step "inetd mode"
systemctl disable --now gatekeeper.socket gatekeeper.service gatekeeper-distccd.service
systemctl enable --now gatekeeper-inetd.socket gatekeeper-inetd.service
ports inetd.ports
mode_checks gatekeeper-inetd.service inetd

step "switch back to the stock distccd"
systemctl disable --now gatekeeper-inetd.socket gatekeeper-inetd.service
systemctl enable distcc
systemctl start distcc
wait_port 3632
ports switched-back.ports

echo done > "$OUT/done"
