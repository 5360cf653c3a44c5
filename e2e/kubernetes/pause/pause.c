/* The pod sandbox's process for the e2e cluster's containerd (its `sandbox_image`): it holds
 * the pod's namespaces open, reaps any orphan that the kernel re-parents to it, and exits on
 * SIGINT or SIGTERM. The cluster cannot pull registry.k8s.io/pause, so it builds this one.
 * Built static (gcc -static) so the image holds this one file. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction stop = {.sa_handler = quit};
    struct sigaction child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
    if (sigaction(SIGINT, &stop, NULL) || sigaction(SIGTERM, &stop, NULL) ||
        sigaction(SIGCHLD, &child, NULL))
        return 1;
    for (;;)
        pause();
}
