/* The kubelet lab's pod sandbox ("pause") image: sleeps as PID 1 of the
 * pod, reaps what is reparented to it, exits on SIGINT/SIGTERM. Built
 * statically by scripts/build-image.sh. */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

int main(void) {
    signal(SIGINT, quit);
    signal(SIGTERM, quit);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
