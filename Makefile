# Install dindhelper: binaries and every system file.
#   make install                      # build release if needed, install under /usr/local
#   make install DESTDIR=/tmp/stage   # stage for packaging (no group is created)
#   make uninstall
# polkit and D-Bus read their files from fixed places, so those do not follow PREFIX.

PREFIX       ?= /usr/local
BINDIR       ?= $(PREFIX)/bin
DOCDIR       ?= $(PREFIX)/share/doc/dindhelper
POLKIT_ACTIONS ?= /usr/share/polkit-1/actions
POLKIT_RULES ?= /etc/polkit-1/rules.d
DBUS_SYSTEMD ?= /usr/share/dbus-1/system.d
DBUS_SERVICES ?= /usr/share/dbus-1/system-services
SYSTEMD_UNITDIR ?= /etc/systemd/system
CARGO        ?= cargo
INSTALL      ?= install

RELEASE := target/release

.PHONY: all build install uninstall check-files

all: build

# cargo decides itself whether anything is out of date.
build:
	$(CARGO) build --release --locked --bins

# Order matters: dbus-daemon resolves <policy group="dindhelper"> when it loads the config
# (on inotify, as soon as the file lands). The group must exist before the D-Bus policy is
# installed, and the bus reloads its config afterwards; otherwise the group's block is
# ignored and members get AccessDenied until the next reload (seen in an nspawn boot).
# polkit's rules.d belongs to user polkitd (mode 0700) where polkitd is installed:
# an existing one is left alone; a new one must stay readable for polkitd.
install: build
	@if [ -z "$(DESTDIR)" ]; then \
		getent group dindhelper >/dev/null || groupadd --system dindhelper; \
		getent group dindhelper-tenant >/dev/null || groupadd --system dindhelper-tenant; \
	fi
	$(INSTALL) -d $(DESTDIR)$(BINDIR)
	$(INSTALL) -m 0755 $(RELEASE)/dindhelperd $(RELEASE)/dindhelperctl $(DESTDIR)$(BINDIR)/
	$(INSTALL) -d $(DESTDIR)$(POLKIT_ACTIONS) $(DESTDIR)$(DBUS_SYSTEMD) \
		$(DESTDIR)$(DBUS_SERVICES) $(DESTDIR)$(SYSTEMD_UNITDIR) $(DESTDIR)$(DOCDIR)
	test -d $(DESTDIR)$(POLKIT_RULES) || $(INSTALL) -d -m 0755 $(DESTDIR)$(POLKIT_RULES)
	$(INSTALL) -m 0644 polkit/org.dindhelper1.policy $(DESTDIR)$(POLKIT_ACTIONS)/
	$(INSTALL) -m 0644 polkit/50-dindhelper.rules $(DESTDIR)$(POLKIT_RULES)/
	$(INSTALL) -m 0644 dbus/org.dindhelper1.conf $(DESTDIR)$(DBUS_SYSTEMD)/
	$(INSTALL) -m 0644 dbus/org.dindhelper1.service $(DESTDIR)$(DBUS_SERVICES)/
	sed -e 's|/usr/local/bin/dindhelperd|$(BINDIR)/dindhelperd|' \
	    -e 's|/usr/local/share/doc/dindhelper|$(DOCDIR)|' \
		systemd/dindhelperd.service >$(DESTDIR)$(SYSTEMD_UNITDIR)/dindhelperd.service
	chmod 0644 $(DESTDIR)$(SYSTEMD_UNITDIR)/dindhelperd.service
	if [ -f README.md ]; then $(INSTALL) -m 0644 README.md $(DESTDIR)$(DOCDIR)/; fi
	@if [ -z "$(DESTDIR)" ]; then \
		if [ -S /run/dbus/system_bus_socket ]; then \
			busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
				ReloadConfig || true; \
		fi; \
		if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi; \
		echo "Installed. Add the provisioning account to group dindhelper:"; \
		echo "  usermod -aG dindhelper <user>   (it takes effect on its next login)"; \
	fi

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/dindhelperd $(DESTDIR)$(BINDIR)/dindhelperctl
	rm -f $(DESTDIR)$(POLKIT_ACTIONS)/org.dindhelper1.policy
	rm -f $(DESTDIR)$(POLKIT_RULES)/50-dindhelper.rules
	rm -f $(DESTDIR)$(DBUS_SYSTEMD)/org.dindhelper1.conf
	rm -f $(DESTDIR)$(DBUS_SERVICES)/org.dindhelper1.service
	rm -f $(DESTDIR)$(SYSTEMD_UNITDIR)/dindhelperd.service
	rm -rf $(DESTDIR)$(DOCDIR)
	@if [ -z "$(DESTDIR)" ]; then \
		if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi; \
		echo "Kept group dindhelper and /var/lib/dindhelper (state, images);"; \
		echo "remove them by hand if you no longer need them."; \
	fi

# Validate the system files (needs libxml2-utils; systemd-analyze where available).
check-files:
	xmllint --noout --dtdvalid /usr/share/polkit-1/policyconfig-1.dtd polkit/org.dindhelper1.policy
	xmllint --noout dbus/org.dindhelper1.conf
	xmllint --noout dbus/org.dindhelper1.xml
